"""Where the time of one MAML meta-iteration goes: the operators with the most self CPU time,
from ``torch.profiler``, for a config's own training step (episode sampling, meta-loss, backward,
Adam), plus the median seconds per iteration around it.

    python benchmarks/maml_profile.py [CONFIG] [--set key=value ...] [--iters 20] [--threads 2]
        [--out benchmarks/results/maml_profile.json]

The default is the time-to-accuracy protocol: configs/maml_omniglot_5w1s.yaml with
``algorithm.batch_tasks=true`` (meta-batch 32, 1 query per class in training, vmap over tasks).
Uses the real Omniglot data (``--data-dir`` or ``METATL_DATA_DIR``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _step import MAML_5W1S, ROOT, machine, training_step, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(MAML_5W1S))
    parser.add_argument("--set", nargs="*", default=["algorithm.batch_tasks=true"], dest="overrides")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (after 2 warm-up ones)")
    parser.add_argument("--profiled", type=int, default=3, help="iterations under the profiler")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "maml_profile.json"))
    args = parser.parse_args(argv)
    if args.data_dir:
        os.environ["METATL_DATA_DIR"] = args.data_dir

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    facts = machine(args.threads)
    _, _, _, step = training_step(args.config, args.overrides)

    start = time.perf_counter()
    step()  # with algorithm.compile=true, this one compiles
    first = time.perf_counter() - start
    step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profiled):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_ms_per_iter": round(e.self_cpu_time_total / 1000 / args.profiled, 2),
            "self_share": round(e.self_cpu_time_total / total, 4), "calls_per_iter": e.count // args.profiled}
           for e in events[:args.top]]
    result = {
        "benchmark": "maml_profile", "config": os.path.relpath(args.config, ROOT), "overrides": args.overrides,
        **facts, "seconds_per_iter_median": statistics.median(times), "seconds_per_iter_min": min(times),
        "first_iter_seconds": first,
        "profiled_ms_per_iter": round(total / 1000 / args.profiled, 1), "top_ops": top,
    }
    print(f"median {result['seconds_per_iter_median']:.3f} s/iter over {args.iters}; profiled "
          f"{result['profiled_ms_per_iter']} ms/iter of self CPU time")
    for row in top:
        print(f"  {row['op']:<45} {row['self_ms_per_iter']:>8.1f} ms  {100 * row['self_share']:5.1f}%  "
              f"{row['calls_per_iter']} calls")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
