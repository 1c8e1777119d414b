"""Milliseconds per training step of the conv4 max-pool net (Prototypical Networks' embedding) on one
60-way 1-shot episode with 5 queries per class (60 support + 300 query images, 28x28), for the
choices that change its speed but not its function:

- block order: conv-BN-ReLU-pool (the papers') or conv-BN-pool-ReLU (metatl's; max and ReLU
  commute, so outputs and gradients are the same, tests/test_backbones.py);
- memory layout: contiguous or channels-last (``model.channels_last``);
- precision: float32 or bfloat16 autocast (``train.precision``).

A step is the support and query forward passes, a squared-norm loss, backward and an Adam step; the
median of ``--steps`` steps after 3 warm-up steps is reported.

    python benchmarks/conv4_pool_step.py [--threads 2] [--steps 20] [--out benchmarks/results/conv4_pool_step_cpu.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def papers_order(net: nn.Module) -> nn.Module:
    """The same net with each block written conv-BN-ReLU-pool (parameters keep their names)."""
    mods = list(net.features)
    for i in range(len(mods) - 1):
        if isinstance(mods[i], nn.MaxPool2d) and isinstance(mods[i + 1], nn.ReLU):
            mods[i], mods[i + 1] = mods[i + 1], mods[i]
    net.features = nn.Sequential(*mods)
    return net


def step_ms(order: str, channels_last: bool, precision: str, steps: int) -> float:
    from metatl.nn import conv4_pool

    torch.manual_seed(0)
    net = conv4_pool(out_features=0, bn_mode="running", channels_last=channels_last)
    if order == "conv-bn-relu-pool":
        net = papers_order(net)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    support, query = torch.rand(60, 1, 28, 28), torch.rand(300, 1, 28, 28)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = net.embed(support).float().square().mean() + net.embed(query).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "conv4_pool_step_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from metatl.engine.trainer import hardware

    rows = []
    for order, cl, precision in itertools.product(("conv-bn-relu-pool", "conv-bn-pool-relu"), (False, True),
                                                  ("float32", "bfloat16")):
        ms = step_ms(order, cl, precision, args.steps)
        rows.append({"order": order, "channels_last": cl, "precision": precision, "ms_per_step": round(ms, 1)})
        print(f"{order:<18} channels_last={cl!s:<5} {precision:<8} {ms:7.1f} ms", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "steps": args.steps, "hardware": hardware(),
                               "torch_version": torch.__version__, "episode": "60 support + 300 query images",
                               "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
