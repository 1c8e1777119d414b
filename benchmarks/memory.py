"""Peak memory of a meta-gradient against the number of inner steps: second-order MAML with and
without gradient checkpointing of the inner loop (``train.inner_checkpoint``), and iMAML.

Each setting runs in a fresh process: it builds the sampler, the learner and a few meta-batches,
resets the kernel's peak-RSS mark (``/proc/self/clear_refs``; elsewhere the peak since the start
counts, which may hide small steps) after one warm-up meta-gradient and ``malloc_trim``, then takes ``--iters`` meta-gradients with the ``loop``
executor and one thread, and reports the peak resident set size above the level before the steps.
Omniglot 5-way 1-shot with the MAML config's conv4 and episodes (its data: ``METATL_DATA_DIR``).

    python benchmarks/memory.py                 # writes benchmarks/results/memory.json
    python benchmarks/memory.py --quick --out memory_quick.json   # a smoke run, anywhere but results/
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "maml_omniglot_5w1s.yaml"


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


def child(args) -> dict:
    """One setting, measured in this process."""
    import torch
    import yaml

    from metatl.config import from_dict
    from metatl.data import build_sampler
    from metatl.engine.build import build_learner
    from metatl.engine.executors import make_executor
    from metatl.engine.recompute import set_inner_checkpoint

    torch.set_num_threads(1)
    torch.manual_seed(0)
    raw = yaml.safe_load(CONFIG.read_text())
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


def settings(quick: bool) -> list[tuple[str, int, bool]]:
    if quick:
        return [("maml", 1, False), ("maml", 2, True), ("imaml", 2, False)]
    maml = [("maml", k, c) for k in (1, 5, 10) for c in (False, True)]
    return maml + [("imaml", k, False) for k in (1, 5, 10, 20)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=2, help="meta-gradients per setting")
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="three small settings (a smoke run)")
    p.add_argument("--child", nargs=3, metavar=("ALGORITHM", "STEPS", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.algorithm, args.steps, args.checkpoint = args.child[0], int(args.child[1]), args.child[2] == "1"
        print(json.dumps(child(args)))
        return 0
    rows = []
    common = ["--meta-batch", str(args.meta_batch), "--iters", str(args.iters), "--cg-steps", str(args.cg_steps)]
    for algorithm, steps, checkpoint in settings(args.quick):
        command = [sys.executable, __file__, *common, "--child", algorithm, str(steps), "1" if checkpoint else "0"]
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
        "command": "python benchmarks/memory.py",
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


if __name__ == "__main__":
    raise SystemExit(main())
