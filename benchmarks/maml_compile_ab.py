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
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "maml_compile_ab.json"))
    args = ap.parse_args()

    from metatl.config import load_config
    from metatl.engine.build import build_learner, build_sampler
    from metatl.engine.trainer import hardware, keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    variants = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        cfg = load_config(ROOT / "configs" / "maml_omniglot_5w1s.yaml",
                          ["algorithm.batch_tasks=true", f"algorithm.compile={str(compile_).lower()}", *args.overrides])
        sampler = build_sampler(cfg.data, "train")
        learner = build_learner(cfg, sampler)
        variants[name] = (cfg, sampler, learner, torch.optim.Adam(learner.parameters(), lr=cfg.train.lr),
                          torch.Generator().manual_seed(0))

    def step(name):
        cfg, sampler, learner, optimizer, generator = variants[name]
        loss, _ = learner.meta_loss(sampler.sample_batch(cfg.train.meta_batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    first = {}
    for name in variants:
        start = time.perf_counter()
        step(name)
        first[name] = time.perf_counter() - start
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            for _ in range(args.steps):
                start = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - start)
    results = {name: {"seconds_per_iter_median": statistics.median(t), "seconds_per_iter_min": min(t),
                      "steps": len(t), "first_iter_seconds": first[name]} for name, t in times.items()}
    for name, r in results.items():
        print(f"{name:9s} {r['seconds_per_iter_median']:.4f} s/iter median, first iteration {r['first_iter_seconds']:.1f} s")
    record = {"benchmark": "maml_compile_ab", "overrides": args.overrides, "threads": args.threads,
              "rounds": args.rounds, "steps": args.steps, "hardware": hardware(), "torch": torch.__version__,
              "inductor_cache": "TORCHINDUCTOR_CACHE_DIR set" if os.environ.get("TORCHINDUCTOR_CACHE_DIR") else "default",
              "load_average_at_start": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
