"""What the speed benchmarks share: the execution settings they pass (:data:`EXECUTION`), a config's
training step as the trainer runs it, steps of several variants interleaved, and the facts about the
machine that every benchmark JSON records."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAML_5W1S = ROOT / "configs" / "maml_omniglot_5w1s.yaml"

# Every execution setting the benchmarks pass on top of a config, in this one place: when a setting
# is renamed, only this table changes. "defaults" is the configs' own choice; "tuned" the best flags
# found by hand for second-order MAML's 15-query step on CPUs (task threads, vmap over the inner
# loops, the conv nets' fast kernels), which "auto" now picks for the conv nets.
EXECUTION = {
    "defaults": [],
    "tuned": ["train.executor=threads_inner_vmap", "model.fast=true"],
}


def execution_settings(executor="auto", plain=False, maml=True) -> tuple[dict, dict]:
    """``(train, model)`` config entries for ``maml_speed.py``'s execution options: ``executor``
    (``train.executor``) and ``plain`` (``model.fast: false``, every layer as it is)."""
    return {"executor": executor or "auto"}, {"fast": not plain}


def training_step(config=MAML_5W1S, overrides: Sequence[str] = (), seed: int = 0):
    """Build a config's learner on its training split; returns ``(cfg, sampler, learner, step)``.

    ``step()`` is one meta-iteration: a meta-batch from a seeded generator, the meta-loss through
    the config's executor (``train.executor``), its backward and an Adam step at the config's
    learning rate.
    """
    from metatl.build import build_learner, build_sampler
    from metatl.config import load_config
    from metatl.engine.executors import make_executor

    torch.manual_seed(seed)
    cfg = load_config(config, list(overrides))
    sampler = build_sampler(cfg.data, "train")
    learner = build_learner(cfg, sampler)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(seed)
    executor = make_executor(cfg.train.executor, learner, cfg.train.device, cfg.train.precision)

    def step() -> None:
        loss, _ = executor(learner, sampler.sample_batch(cfg.train.meta_batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return cfg, sampler, learner, step


def interleaved(variants: dict, rounds: int, calls: int, warmup: bool = True, clock=time.perf_counter) -> dict:
    """Seconds of each call of each variant (``name -> callable``), the variants taking turns,
    ``calls`` calls each per round, so that the machine's drift hits all alike. With ``warmup``,
    each variant runs once first, untimed. ``clock``: wall-clock by default; ``time.process_time``
    counts the CPU time of the process instead (one thread on a busy machine: the work done)."""
    if warmup:
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            for _ in range(calls):
                start = clock()
                run()
                times[name].append(clock() - start)
    return times


def matmul_gflops(threads: int, size: int = 1024, calls: int = 30) -> float:
    """GFLOP/s of a ``size`` x ``size`` float32 matrix product on ``threads`` threads: how fast the
    machine runs at the moment (on our shared 2-core machines it moves by 20-40% within minutes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        return 2 * size**3 * calls / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(previous)


def machine(threads: int) -> dict:
    """Hardware, torch version, threads, the load average, the date and the machine's speed at the
    moment (:func:`matmul_gflops`); call it before timing."""
    from metatl.engine.trainer import hardware

    return {
        "hardware": hardware(),
        "torch": torch.__version__,
        "threads": threads,
        "load_average_at_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "matmul_gflops_at_start": matmul_gflops(threads),
    }


def write_json(path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
