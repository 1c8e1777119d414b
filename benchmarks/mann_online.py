"""The MANN paper's online protocol (Santoro et al. 2016, table 1): accuracy at the 1st, 2nd, 5th
and 10th instance of each class in sequences of 5 Omniglot classes x 10 instances, labels shuffled
per episode, for a checkpoint trained with configs/mann_omniglot_online.yaml.

    python benchmarks/mann_online.py RUN/last.pt [--episodes 1000] [--split test]
        [--out benchmarks/results/mann_online.json]

``--split train`` scores sequences of training characters (to tell fitting from generalizing).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default="benchmarks/results/mann_online.json")
    args = p.parse_args(argv)
    from metatl.data import build_sampler
    from metatl.engine.trainer import hardware, load_trainer
    from metatl.meta.mann import mann_online_accuracy

    trainer = load_trainer(args.checkpoint, ["data.ways=5", "data.shots=5", "data.queries=5"], progress=False)
    acc = mann_online_accuracy(trainer.learner, build_sampler(trainer.cfg.data, args.split), args.episodes, args.seed)
    result = {"checkpoint": args.checkpoint, "memory": trainer.cfg.algorithm.get("memory", True),
              "config": trainer.cfg.name, "algorithm": trainer.cfg.algorithm,
              "backbone": trainer.cfg.model.get("name"), "split": args.split, "episodes": args.episodes,
              "eval_seed": args.seed, "iterations": trainer.iteration,
              "train_seconds": trainer.train_seconds,
              "accuracy_by_instance": {str(k): v for k, v in acc.items()},
              "published_mann": {"2": 0.828, "5": 0.949},  # Santoro et al. 2016, table 1
              "hardware_of_this_scoring": hardware(), "torch_version": torch.__version__}
    print(" ".join(f"instance {k}: {100 * v['mean']:.1f} +- {100 * v['ci95']:.1f}%" for k, v in acc.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
