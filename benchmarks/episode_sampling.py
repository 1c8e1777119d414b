"""Milliseconds to sample a meta-batch of Omniglot episodes: ``EpisodeSampler.sample_batch``
(all examples gathered in one ``ClassPool.get_many`` call) against the same episodes gathered one
class at a time (``pool.get`` per class, as the sampler did before), interleaved in one process.
MAML's training protocol (5-way 1-shot, 1 query per class) and the speed targets' episodes
(15 queries per class), meta-batch 32, the ``maml`` split's training classes.

    python benchmarks/episode_sampling.py [--rounds 5] [--out benchmarks/results/episode_sampling.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _step import ROOT, interleaved, machine, write_json


def one_class_at_a_time(sampler, size: int, generator: torch.Generator):
    """The episodes of ``sampler.sample_batch``, each class's examples fetched by ``pool.get``."""
    n, k, q, pool = sampler.ways, sampler.shots, sampler.queries, sampler.pool
    episodes = []
    for _ in range(size):
        classes = torch.randperm(len(pool), generator=generator)[:n].tolist()
        xs = [pool.get(c, torch.randperm(pool.counts[c], generator=generator)[:k + q]) for c in classes]
        episodes.append((torch.cat([x[:k] for x in xs]), torch.cat([x[k:] for x in xs])))
    return episodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "episode_sampling.json"))
    args = ap.parse_args()

    from metatl.config import load_config
    from metatl.engine.build import build_sampler

    torch.set_num_threads(args.threads)
    record = {"benchmark": "episode_sampling", **machine(args.threads), "meta_batch": 32, "results": {}}
    for queries in (1, 15):
        cfg = load_config(ROOT / "configs" / "maml_omniglot_5w1s.yaml", [f"data.train_queries={queries}"])
        sampler = build_sampler(cfg.data, "train")
        g = torch.Generator().manual_seed(0)
        times = interleaved({"sample_batch": lambda: sampler.sample_batch(32, g),
                             "one_class_at_a_time": lambda: one_class_at_a_time(sampler, 32, g)}, args.rounds, 10)
        res = {name: {"ms_median": 1e3 * statistics.median(t), "calls": len(t)} for name, t in times.items()}
        record["results"][f"{queries}_queries"] = res
        print(f"{queries} queries per class: " + "  ".join(f"{n} {r['ms_median']:.2f} ms" for n, r in res.items()))
    write_json(args.out, record)


if __name__ == "__main__":
    main()
