"""Seconds per meta-iteration and peak memory of MAML, first-order MAML and Reptile on Omniglot
5-way 1-shot episodes (meta-batch 32, 15 queries per class, 1 inner step), for both conv nets.

Each setting runs in a fresh subprocess (so peak RSS is its own) through the real trainer step:
episode sampling, meta-loss, backward and optimizer step. Uses the real Omniglot data when it is
found (else random images of the same shape; the speed does not depend on pixel values).

    python benchmarks/maml_speed.py [--iters 10] [--threads 2] [--out benchmarks/results/maml_speed.json]
    python benchmarks/maml_speed.py --processes 2 --threads 1     # the meta-batch split over 2 processes
    python benchmarks/maml_speed.py --algorithms maml --executor vmap    # any train.executor (default: auto)

With ``--processes N`` the trainer splits each meta-batch over N processes (``train.processes``,
``--threads`` threads each); the time is process 0's, and the peak memory is per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "maml": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
    "fomaml": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "first_order": True},
    "reptile": {"name": "reptile", "inner_lr": 0.001, "inner_steps": 1, "inner_batch": None},
}
BACKBONES = ("conv4_stride", "conv4_pool")


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
        from metatl.data import EpisodeSampler, TensorClassPool
        from metatl.engine.build import build_learner

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=1, help="split each meta-batch over this many processes")
    ap.add_argument("--algorithms", nargs="+", default=list(SETTINGS))
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--plain", action="store_true", help="model.fast=false (every layer as it is)")
    ap.add_argument(
        "--executor",
        default="auto",
        help="train.executor (auto, loop, inner_vmap, vmap, compile, "
        "threads, threads_inner_vmap); with compile the warm-up iterations include the compilation",
    )
    ap.add_argument("--out", default="benchmarks/results/maml_speed.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    options = {"plain": args.plain, "executor": args.executor}
    if args.child:
        print(
            json.dumps(child(*args.child, args.iters, args.warmup, args.threads, args.device, args.processes, options))
        )
        return

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


if __name__ == "__main__":
    main()
