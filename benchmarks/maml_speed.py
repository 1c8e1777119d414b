"""The meta-gradient step of MAML-type learners, measured three ways (one benchmark, three modes).

    python benchmarks/maml_speed.py step      # seconds and peak memory per step -> results/maml_speed.json
    python benchmarks/maml_speed.py memory    # peak memory against the inner steps -> results/memory.json
    python benchmarks/maml_speed.py scaling   # the meta-batch split over 1, 2 processes -> results/scaling.json
    python benchmarks/maml_speed.py MODE --help

``step``: seconds per meta-iteration and peak memory of MAML, first-order MAML and Reptile on
Omniglot 5-way 1-shot episodes (meta-batch 32, 15 queries per class, 1 inner step), for both conv
nets, through the real trainer step (episode sampling, meta-loss, backward, optimizer step).

``memory``: peak resident memory of a meta-gradient against the number of inner steps: second-order
MAML with and without gradient checkpointing of the inner loop (``train.inner_checkpoint``), and
iMAML.

``scaling``: ``step``'s second-order MAML with the meta-batch split over 1, 2, ... processes
(``train.processes``), and the efficiency relative to one process.

Every setting runs in a fresh process, so that its peak memory is its own. ``--quick`` (``memory``)
or ``--iters 1 --warmup 1`` (``step``, ``scaling``) with ``--out`` elsewhere than results/ gives a
smoke run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(HERE) not in sys.path:  # _step.py, when this file is imported rather than run
    sys.path.insert(0, str(HERE))

SETTINGS = {
    "maml": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
    "fomaml": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "first_order": True},
    "reptile": {"name": "reptile", "inner_lr": 0.001, "inner_steps": 1, "inner_batch": None},
}
BACKBONES = ("conv4_stride", "conv4_pool")


def _command(mode: str, argv) -> str:
    """The command line that reproduces a record, as the results page prints it."""
    args = list(argv) if argv is not None else sys.argv[2:]
    return shlex.join(["python", "benchmarks/maml_speed.py", mode, *args])


# ---------------------------------------------------------------------------------------------------
# step: seconds per meta-iteration and peak memory


def child(
    algo: str,
    backbone: str,
    iters: int,
    warmup: int,
    threads: int,
    device: str,
    processes: int = 1,
    options: dict = None,
) -> dict:
    """``options``: ``plain`` (``model.fast=false``), a bool; ``executor``: ``train.executor``."""
    options = options or {}
    if processes > 1:
        import tempfile

        from metatl.engine import distributed

        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "rank0.json"
            distributed.launch(
                _rank_child,
                processes,
                device,
                algo,
                backbone,
                iters,
                warmup,
                threads,
                device,
                processes,
                str(result),
                options,
            )
            return json.loads(result.read_text())
    return _measure(algo, backbone, iters, warmup, threads, device, 1, options)


def _rank_child(algo, backbone, iters, warmup, threads, device, processes, result_path, options) -> None:
    from metatl.engine import distributed

    res = _measure(algo, backbone, iters, warmup, threads, device, processes, options)
    if distributed.rank() == 0:
        Path(result_path).write_text(json.dumps(res))


def _measure(
    algo: str, backbone: str, iters: int, warmup: int, threads: int, device: str, processes: int, options: dict
) -> dict:
    import resource

    import torch
    from _step import execution_settings

    from metatl.config import from_dict
    from metatl.engine.trainer import Trainer

    torch.set_num_threads(threads)
    algorithm = dict(SETTINGS[algo])
    train, model = execution_settings(maml=algorithm["name"] == "maml", **options)
    fast = model["fast"]
    raw = {
        "algorithm": algorithm,
        "model": {"name": backbone, **model},
        "data": {"name": "omniglot", "ways": 5, "shots": 1, "queries": 15, "split": "maml"},
        "train": {
            "meta_batch": 32,
            "iterations": iters + warmup,
            "device": device,
            "num_threads": threads,
            "processes": processes,
            "executor": train["executor"],
        },
    }
    data = "omniglot"
    try:
        trainer = Trainer(from_dict(raw), "/dev/null", progress=False)
    except (FileNotFoundError, ValueError):  # no real data here: Omniglot-shaped random images
        from metatl.build import build_learner
        from metatl.data import EpisodeSampler, TensorClassPool

        data = "random 28x28 images (Omniglot not found)"
        pool = TensorClassPool(torch.rand(200 * 20, 1, 28, 28), torch.arange(200).repeat_interleave(20))
        sampler = EpisodeSampler(pool, 5, 1, 15)
        sampler.input_spec = {"in_channels": 1, "image_size": 28}
        raw["data"] = {"name": "sinusoid"}
        trainer = Trainer(from_dict(raw), "/dev/null", progress=False)
        trainer.train_tasks = sampler
        trainer.learner = build_learner(trainer.cfg, sampler).to(device)
        trainer.optimizer = torch.optim.Adam(trainer.learner.parameters(), lr=1e-3)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(iters + warmup):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - start  # includes the compilation with --compile
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    out = {
        "algorithm": algo,
        "backbone": backbone,
        "data": data,
        "iters": iters,
        "seconds_per_iter_median": times[len(times) // 2],
        "seconds_per_iter_mean": sum(times) / len(times),
        "seconds_per_iter_min": times[0],
        "first_iter_seconds": first,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_loop_mb": rss0 / 1024,
        "processes": processes,
        "fast": fast,
        "executor": trainer.executor.name,
        "executors_chosen": [e.name for e in getattr(trainer.executor, "chosen", {}).values()],
    }
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def step(argv=None) -> int:
    """Seconds per meta-iteration and peak memory of MAML, first-order MAML and Reptile (Omniglot
    5-way 1-shot, meta-batch 32, 15 queries per class, 1 inner step), each setting in a fresh process.

    Uses the real Omniglot data when it is found (else random images of the same shape; the speed
    does not depend on pixel values). With ``--processes N`` the trainer splits each meta-batch over
    N processes (``train.processes``, ``--threads`` threads each); the time is process 0's, and the
    peak memory is per process.

        python benchmarks/maml_speed.py step [--iters 10] [--threads 2]
        python benchmarks/maml_speed.py step --processes 2 --threads 1   # the meta-batch over 2 processes
        python benchmarks/maml_speed.py step --algorithms maml --executor vmap   # any train.executor
    """
    ap = argparse.ArgumentParser(
        prog="maml_speed.py step", description=step.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=1, help="split each meta-batch over this many processes")
    ap.add_argument("--algorithms", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--plain", action="store_true", help="model.fast=false (every layer as it is)")
    ap.add_argument(
        "--executor",
        default="auto",
        help="train.executor (auto, loop, inner_vmap, vmap, compile, "
        "threads, threads_inner_vmap); with compile the warm-up iterations include the compilation",
    )
    ap.add_argument("--out", default=str(RESULTS / "maml_speed.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    options = {"plain": args.plain, "executor": args.executor}
    if args.child:
        print(
            json.dumps(child(*args.child, args.iters, args.warmup, args.threads, args.device, args.processes, options))
        )
        return 0

    import torch
    from _step import matmul_gflops

    from metatl.engine.trainer import hardware

    torch.set_num_threads(args.threads)
    speed_at_start = matmul_gflops(args.threads) if args.device == "cpu" else None
    results = []
    for algo in args.algorithms:
        for backbone in args.backbones:
            cmd = [
                sys.executable,
                __file__,
                "step",
                "--child",
                algo,
                backbone,
                "--iters",
                str(args.iters),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--processes",
                str(args.processes),
            ]
            for key, value in options.items():
                if value:
                    cmd += [f"--{key.replace('_', '-')}"] + ([value] if isinstance(value, str) else [])
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(
                f"{algo:8s} {backbone:13s} {res['seconds_per_iter_median']:.3f} s/iter  "
                f"peak RSS {res['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            results.append(res)
    record = {
        "benchmark": "maml_speed",
        "command": _command("step", argv),
        "setting": "Omniglot 5-way 1-shot, meta-batch 32, 15 queries/class, 1 inner step, float32",
        "hardware": hardware(args.device),
        "device": args.device,
        "threads": args.threads,
        "processes": args.processes,
        **options,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    if args.device == "cpu":  # how fast the machine ran around the measurement (GFLOP/s of a matrix product)
        record.update(matmul_gflops_at_start=speed_at_start, matmul_gflops_at_end=matmul_gflops(args.threads))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# memory: peak memory against the inner steps


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux); the peak from
    getrusage elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def release_freed_memory() -> None:
    """Return the heap's free pages to the kernel (glibc's ``malloc_trim``; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_child(args) -> dict:
    """One ``memory`` setting, measured in this process."""
    import torch
    import yaml
    from _step import MAML_5W1S

    from metatl.build import build_learner
    from metatl.config import from_dict
    from metatl.data import build_sampler
    from metatl.engine.executors import make_executor
    from metatl.engine.recompute import set_inner_checkpoint

    torch.set_num_threads(1)
    torch.manual_seed(0)
    raw = yaml.safe_load(MAML_5W1S.read_text())
    raw["algorithm"] = (
        {"name": "maml", "inner_lr": 0.4, "inner_steps": args.steps}
        if args.algorithm == "maml"
        else {"name": "imaml", "inner_steps": args.steps, "cg_steps": args.cg_steps}
    )
    cfg = from_dict(raw)
    sampler = build_sampler(cfg.data, "train")
    learner = build_learner(cfg, sampler)
    generator = torch.Generator().manual_seed(0)
    batches = [sampler.sample_batch(args.meta_batch, generator) for _ in range(args.iters + 1)]
    set_inner_checkpoint(learner, args.checkpoint)
    run = make_executor("loop", learner)

    def meta_gradient(batch):
        learner.zero_grad(set_to_none=False)
        loss, _ = run(learner, batch)
        loss.backward()

    meta_gradient(batches.pop())  # warm-up: kernels, thread pools and gradient buffers are allocated once
    release_freed_memory()  # else the warm-up's freed pages, still resident, would hide the steps' peak
    exact = reset_peak()
    before = rss_mib("VmRSS") if exact else rss_mib("VmHWM")
    start = time.perf_counter()
    for b in batches:
        meta_gradient(b)
    seconds = (time.perf_counter() - start) / args.iters
    peak = rss_mib("VmHWM")
    return {
        "algorithm": args.algorithm,
        "inner_steps": args.steps,
        "inner_checkpoint": args.checkpoint,
        "peak_mib": round(peak - before, 2),
        "baseline_mib": round(before, 2),
        "seconds_per_step": round(seconds, 3),
        "peak_reset": exact,
    }


def memory_settings(quick: bool) -> list[tuple[str, int, bool]]:
    if quick:
        return [("maml", 1, False), ("maml", 2, True), ("imaml", 2, False)]
    maml = [("maml", k, c) for k in (1, 5, 10) for c in (False, True)]
    return maml + [("imaml", k, False) for k in (1, 5, 10, 20)]


def memory(argv=None) -> int:
    """Peak memory of a meta-gradient against the number of inner steps: second-order MAML with and
    without gradient checkpointing of the inner loop (``train.inner_checkpoint``), and iMAML.

    Each setting runs in a fresh process: it builds the sampler, the learner and a few meta-batches,
    resets the kernel's peak-RSS mark (``/proc/self/clear_refs``; elsewhere the peak since the start
    counts, which may hide small steps) after one warm-up meta-gradient and ``malloc_trim``, then
    takes ``--iters`` meta-gradients with the ``loop`` executor and one thread, and reports the peak
    resident set size above the level before the steps. Omniglot 5-way 1-shot with the MAML config's
    conv4 and episodes (its data: ``METATL_DATA_DIR``).

        python benchmarks/maml_speed.py memory                  # writes benchmarks/results/memory.json
        python benchmarks/maml_speed.py memory --quick --out memory_quick.json   # a smoke run
    """
    p = argparse.ArgumentParser(
        prog="maml_speed.py memory", description=memory.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(RESULTS / "memory.json"))
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=2, help="meta-gradients per setting")
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="three small settings (a smoke run)")
    p.add_argument("--child", nargs=3, metavar=("ALGORITHM", "STEPS", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.algorithm, args.steps, args.checkpoint = args.child[0], int(args.child[1]), args.child[2] == "1"
        print(json.dumps(memory_child(args)))
        return 0
    rows = []
    common = ["--meta-batch", str(args.meta_batch), "--iters", str(args.iters), "--cg-steps", str(args.cg_steps)]
    for algorithm, steps, checkpoint in memory_settings(args.quick):
        command = [
            *(sys.executable, __file__, "memory", *common),
            *("--child", algorithm, str(steps), "1" if checkpoint else "0"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{algorithm:6s} steps {steps:2d} checkpoint {str(checkpoint):5s}: peak +{row['peak_mib']:.1f} MiB, "
            f"{row['seconds_per_step']:.2f} s per meta-gradient",
            flush=True,
        )
    result = {
        "command": _command("memory", argv),
        "task": "Omniglot 5-way 1-shot, 1 query per class, conv4_stride (configs/maml_omniglot_5w1s.yaml)",
        "meta_batch": args.meta_batch,
        "iters": args.iters,
        "executor": "loop",
        "threads": 1,
        "imaml_cg_steps": args.cg_steps,
        "measure": "peak resident set size above the level before the meta-gradients, fresh process per setting",
        "hardware": f"{cpu_name()}, {os.cpu_count()} cores",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# scaling: the meta-batch split over processes


def scaling(argv=None) -> int:
    """Second-order MAML's 15-query step with the meta-batch split over 1, 2, ... processes.

    ``step``'s setting (Omniglot 5-way 1-shot, meta-batch 32, 15 queries per class, one inner step,
    ``conv4_stride``, the trainer's step with the config defaults) with the meta-batch split over
    1, 2, ... processes (``train.processes``: PyTorch's elastic launcher, as torchrun runs it), each
    setting in a fresh process, process 0's median seconds per step.

        python benchmarks/maml_speed.py scaling                                   # CPU: 1 and 2 processes
        python benchmarks/maml_speed.py scaling --device cuda --processes 1 2 4 8 # one GPU per process

    On CPUs the processes share the machine's cores (``--cores``, default all: ``cores / P`` threads
    each), so the ideal is the one-process time and the efficiency is ``t1 / tP``. On GPUs each
    process has a GPU of its own, so the ideal is ``t1 / P`` and the efficiency is ``t1 / (P tP)``.
    """
    ap = argparse.ArgumentParser(
        prog="maml_speed.py scaling", description=scaling.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process (or GPU) counts")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    ap.add_argument("--cores", type=int, default=None, help="CPU cores shared by the processes (default: all)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backbone", default="conv4_stride")
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = ap.parse_args(argv)
    if args.processes[0] != 1:
        ap.error("--processes starts with 1: the efficiencies are relative to one process")

    from _step import machine, write_json

    cores = args.cores or len(os.sched_getaffinity(0))
    gpu = args.device.startswith("cuda")
    record = {
        "benchmark": "scaling",
        "setting": "second-order MAML, Omniglot 5-way 1-shot, meta-batch 32 split over the processes, "
        f"15 queries per class, 1 inner step, {args.backbone}, float32, train.executor auto",
        "device": args.device,
        "cores": cores,
        **machine(cores),
        "command": _command("scaling", argv),
        "results": [],
    }
    base = None
    for p in args.processes:
        threads = max(1, cores // p)
        cmd = [
            *(sys.executable, __file__, "step", "--child", "maml", args.backbone),
            *("--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(threads)),
            *("--device", args.device, "--processes", str(p)),
        ]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        seconds = res["seconds_per_iter_median"]
        base = base or seconds
        speedup = base / seconds
        row = {
            "processes": p,
            "threads_per_process": threads,
            "seconds_per_step": seconds,
            "seconds_per_step_min": res["seconds_per_iter_min"],
            "speedup": speedup,
            "efficiency": speedup / p if gpu else speedup,
            "executor": res["executor"],
            "data": res["data"],
            "peak_rss_mb_per_process": res["peak_rss_mb"],
        }
        record["results"].append(row)
        print(
            f"{p} process(es) x {threads} thread(s): {seconds:.3f} s/step, speedup {speedup:.2f}, "
            f"efficiency {row['efficiency']:.2f}",
            flush=True,
        )
    record["load_average_at_end"] = list(os.getloadavg())
    record["date_end"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(args.out, record)
    return 0


MODES = {"step": step, "memory": memory, "scaling": scaling}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in MODES:
        print(__doc__)
        if argv and argv[0] in ("-h", "--help"):
            return 0
        print(
            f"maml_speed.py needs a mode first: {', '.join(MODES)} (got {' '.join(argv) or 'nothing'})", file=sys.stderr
        )
        return 2
    return MODES[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
