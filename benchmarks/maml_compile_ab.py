"""``algorithm.compile`` against eager vmap for MAML's Omniglot training step, steps of the two
interleaved in one process (so that the machine's drift hits both alike), plus the compile time.

    python benchmarks/maml_compile_ab.py [--rounds 8] [--steps 3] [--set key=value ...]
        [--out benchmarks/results/maml_compile_ab.json]

Default step: configs/maml_omniglot_5w1s.yaml with ``algorithm.batch_tasks=true`` (vmap over 32
tasks, 1 query per class, second order); ``--set data.train_queries=15`` gives the speed
benchmark's episodes. Set ``TORCHINDUCTOR_CACHE_DIR`` to an empty folder to time a cold compile.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _step import ROOT, interleaved, machine, training_step, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "maml_compile_ab.json"))
    args = ap.parse_args()

    from metatl.engine.trainer import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    facts = machine(args.threads)
    steps = {name: training_step(overrides=["algorithm.batch_tasks=true", f"algorithm.compile={flag}",
                                            *args.overrides])[3]
             for name, flag in (("eager", "false"), ("compiled", "true"))}

    first = {}
    for name in steps:
        start = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - start
    times = interleaved(steps, args.rounds, args.steps, warmup=False)  # the first calls ran above
    results = {name: {"seconds_per_iter_median": statistics.median(t), "seconds_per_iter_min": min(t),
                      "steps": len(t), "first_iter_seconds": first[name]} for name, t in times.items()}
    for name, r in results.items():
        print(f"{name:9s} {r['seconds_per_iter_median']:.4f} s/iter median, first iteration {r['first_iter_seconds']:.1f} s")
    record = {"benchmark": "maml_compile_ab", "overrides": args.overrides, **facts,
              "rounds": args.rounds, "steps": args.steps,
              "inductor_cache": "TORCHINDUCTOR_CACHE_DIR set" if os.environ.get("TORCHINDUCTOR_CACHE_DIR") else "default",
              "results": results}
    write_json(args.out, record)


if __name__ == "__main__":
    main()
