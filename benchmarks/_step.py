"""What the MAML step benchmarks share (``batchnorm_forms.py``, ``maml_compile_ab.py``,
``maml_profile.py``): a config's training step as the trainer runs it, and the facts about the
machine that every benchmark JSON records."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
MAML_5W1S = ROOT / "configs" / "maml_omniglot_5w1s.yaml"


def training_step(config=MAML_5W1S, overrides: Sequence[str] = (), seed: int = 0):
    """Build a config's learner on its training split; returns ``(cfg, sampler, learner, step)``.

    ``step()`` is one meta-iteration: a meta-batch from a seeded generator, the meta-loss, its
    backward and an Adam step at the config's learning rate.
    """
    from metatl.config import load_config
    from metatl.engine.build import build_learner, build_sampler

    torch.manual_seed(seed)
    cfg = load_config(config, list(overrides))
    sampler = build_sampler(cfg.data, "train")
    learner = build_learner(cfg, sampler)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(seed)

    def step() -> None:
        loss, _ = learner.meta_loss(sampler.sample_batch(cfg.train.meta_batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return cfg, sampler, learner, step


def interleaved(variants: dict, rounds: int, calls: int, warmup: bool = True) -> dict:
    """Seconds of each call of each variant (``name -> callable``), the variants taking turns,
    ``calls`` calls each per round, so that the machine's drift hits all alike. With ``warmup``,
    each variant runs once first, untimed."""
    if warmup:
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            for _ in range(calls):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


def machine(threads: int) -> dict:
    """Hardware, torch version, threads, the load average and the date; call it before timing."""
    from metatl.engine.trainer import hardware

    return {"hardware": hardware(), "torch": torch.__version__, "threads": threads,
            "load_average_at_start": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
