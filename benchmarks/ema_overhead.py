"""What ``train.ema_decay`` costs per step: MAML's Omniglot training step with and without the
update of a moving average of the weights, interleaved in one process, plus the update alone.

    python benchmarks/ema_overhead.py [--rounds 8] [--steps 3] [--set key=value ...]
        [--out benchmarks/results/ema_overhead.json]

Default step: configs/maml_omniglot_5w1s.yaml with ``algorithm.batch_tasks=true`` (the
time-to-accuracy protocol's step).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _step import ROOT, interleaved, machine, training_step, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decay", type=float, default=0.999)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ema_overhead.json"))
    args = ap.parse_args()

    from metatl.engine.trainer import keep_freed_memory, moving_average

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    facts = machine(args.threads)
    _, _, learner, step = training_step(overrides=["algorithm.batch_tasks=true", *args.overrides])
    average = moving_average(learner, args.decay)

    def step_and_average() -> None:
        step()
        average.update_parameters(learner)

    variants = {"without": step, "with": step_and_average}
    times = interleaved(variants, args.rounds, args.steps)
    updates = []
    for _ in range(200):
        start = time.perf_counter()
        average.update_parameters(learner)
        updates.append(time.perf_counter() - start)
    results = {name: {"seconds_per_iter_median": statistics.median(t), "steps": len(t)} for name, t in times.items()}
    results["update_alone"] = {"seconds_median": statistics.median(updates), "updates": len(updates),
                               "parameters": sum(p.numel() for p in learner.parameters())}
    for name in variants:
        print(f"{name:8s} moving average: {results[name]['seconds_per_iter_median']:.4f} s/iter median")
    print(f"one update alone: {1e3 * results['update_alone']['seconds_median']:.3f} ms")
    write_json(args.out, {"benchmark": "ema_overhead", "overrides": args.overrides, "decay": args.decay, **facts,
                          "rounds": args.rounds, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
