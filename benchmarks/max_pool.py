"""metatl's ``MaxPool2d`` (channels-last kernel, ``max_unpool2d`` backward) against
``torch.nn.MaxPool2d`` on the CPU: the 2x2 pool alone on the max-pool net's activations, and
second-order MAML's 15-query step on ``conv4_pool`` with each pool, interleaved in one process.

    python benchmarks/max_pool.py [--rounds 4] [--out benchmarks/results/max_pool.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from _step import ROOT, interleaved, machine, training_step, write_json

SHAPES = ((75, 64, 28, 28), (75, 64, 14, 14), (75, 64, 7, 7), (5, 64, 28, 28))


def use_pool(model: nn.Module, make) -> None:
    """Replace every 2x2 max-pool of ``model`` with ``make()``."""
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, make())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "max_pool.json"))
    args = ap.parse_args()

    from metatl.engine.trainer import keep_freed_memory
    from metatl.nn import MaxPool2d

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    pools = {"torch": lambda: nn.MaxPool2d(2), "metatl": lambda: MaxPool2d(2)}
    record = {"benchmark": "max_pool", **machine(args.threads), "rounds": args.rounds, "op_ms": {}, "step_s": {}}

    for shape in SHAPES:  # forward and backward of the pool alone
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(F.max_pool2d(x, 2).shape)
        runs = {name: (lambda pool=make(): pool(x).backward(grad)) for name, make in pools.items()}
        times = interleaved(runs, args.rounds, 10)
        record["op_ms"][str(list(shape))] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(shape, "  ".join(f"{n} {1e3 * statistics.median(t):.2f} ms" for n, t in times.items()), flush=True)

    for batch_tasks in ("false", "inner"):  # MAML's step on conv4_pool with each pool
        steps = {}
        for name, make in pools.items():
            _, _, learner, step = training_step(overrides=[
                "model.name=conv4_pool", "data.train_queries=15", f"algorithm.batch_tasks={batch_tasks}"])
            use_pool(learner.model, make)
            step()
            steps[name] = step
        times = interleaved(steps, args.rounds, 2, warmup=False)  # each ran once above
        key = f"maml_conv4_pool_batch_tasks_{batch_tasks}"
        record["step_s"][key] = {name: statistics.median(t) for name, t in times.items()}
        print(key, "  ".join(f"{n} {statistics.median(t):.3f} s" for n, t in times.items()), flush=True)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
