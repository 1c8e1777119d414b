"""What ``train.keep_freed_memory`` (glibc malloc reuses freed pages) does to a training step: seconds
per trainer step and minor page faults per step, with it on and off, in fresh processes that take
turns (on, off, off, on, ...) so a drift of the machine's speed falls on both.

    python benchmarks/malloc_reuse.py [CONFIG] [--set key=value ...] [--rounds 4] [--iters 10]
        [--threads 2] [--out benchmarks/results/malloc_reuse.json]

The default is the MAML time-to-accuracy step: configs/maml_omniglot_5w1s.yaml with
``algorithm.batch_tasks=true`` (meta-batch 32, 1 query per class, vmap over tasks). Uses the real
Omniglot data (``METATL_DATA_DIR``). Another allocator is measured by preloading it
(``LD_PRELOAD=libjemalloc.so.2``); ``keep_freed_memory`` then has nothing to tune, and the record
names the preloaded library.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, overrides: list, iters: int, warmup: int, threads: int) -> dict:
    """One process: ``iters`` timed trainer steps after ``warmup`` ones."""
    import resource

    import torch

    from metatl.config import load_config
    from metatl.engine.trainer import Trainer

    cfg = load_config(config, overrides + [f"train.num_threads={threads}"])
    trainer = Trainer(cfg, "/dev/null", progress=False)
    for _ in range(warmup):
        trainer.step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"keep_freed_memory": cfg.train.keep_freed_memory, "applied": trainer.keeps_freed_memory,
            "seconds_per_iter_median": statistics.median(times),
            "seconds_per_iter_min": min(times), "minor_faults_per_iter": faults / iters,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs" / "maml_omniglot_5w1s.yaml"))
    ap.add_argument("--set", nargs="*", default=["algorithm.batch_tasks=true"], dest="overrides",
                    help="config overrides; they replace the default algorithm.batch_tasks=true")
    ap.add_argument("--rounds", type=int, default=4, help="processes per setting")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "malloc_reuse.json"))
    ap.add_argument("--child", choices=["true", "false"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = measure(args.config, args.overrides + [f"train.keep_freed_memory={args.child}"], args.iters,
                      args.warmup, args.threads)
        print(json.dumps(res))
        return 0

    from metatl.engine.trainer import hardware

    start_load = os.getloadavg()
    runs = []
    for r in range(args.rounds):
        for keep in (("true", "false") if r % 2 == 0 else ("false", "true")):
            cmd = [sys.executable, __file__, args.config, "--set", *args.overrides, "--child", keep,
                   "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"the measuring process failed (keep_freed_memory={keep}):\n{proc.stderr}")
            res = json.loads(proc.stdout.splitlines()[-1])
            print(f"keep_freed_memory={keep:5s}  {res['seconds_per_iter_median']:.3f} s/iter  "
                  f"{res['minor_faults_per_iter']:8.0f} page faults/iter", flush=True)
            runs.append(res)
    summary = {}
    for keep in (True, False):
        mine = [r for r in runs if r["keep_freed_memory"] == keep]
        summary[f"keep_freed_memory={str(keep).lower()}"] = {
            "seconds_per_iter_median_of_processes": statistics.median(r["seconds_per_iter_median"] for r in mine),
            "minor_faults_per_iter_median": statistics.median(r["minor_faults_per_iter"] for r in mine)}
    record = {"benchmark": "malloc_reuse", "config": os.path.relpath(args.config, ROOT), "overrides": args.overrides,
              "threads": args.threads, "iters": args.iters, "warmup": args.warmup, "hardware": hardware(),
              "ld_preload": [os.path.basename(lib) for lib in os.environ.get("LD_PRELOAD", "").split()],
              "load_average_at_start": list(start_load), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for name, s in summary.items():
        print(f"{name}: {s['seconds_per_iter_median_of_processes']:.3f} s/iter, "
              f"{s['minor_faults_per_iter_median']:.0f} page faults/iter")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
