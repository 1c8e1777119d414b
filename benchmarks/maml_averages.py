"""Which moving average of the weights to score: one MAML time-to-accuracy run that keeps several
averages at once, then every snapshot scored with each of them and with the raw weights, on the
validation and the test classes (600 fixed episodes each).

    python benchmarks/maml_averages.py runs/maml_averages [--set key=value ...] \\
        [--out benchmarks/results/maml_5w1s_averages.json]

The run: configs/maml_omniglot_5w1s.yaml for 15 minutes on 2 threads with the vmap path and
snapshots every 2.5 minutes, ``train.ema_decay=0.999`` (the trainer's own average), and besides it
the same warm-up with decays 0.99, 0.995 and 0.998, and polynomial-decay averages (Shamir & Zhang
2013: weight ``(eta + 1) / (t + eta)`` on the t-th weights) with eta 1 and 3. ``--score-only``
scores an existing run folder again.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from _step import MAML_5W1S, ROOT, machine, write_json

PROTOCOL = ["train.time_budget_min=15", "train.snapshot_minutes=[2.5,5,7.5,10,12.5,15]", "train.num_threads=2",
            "algorithm.batch_tasks=true", "train.val_every=0", "train.ema_decay=0.999"]
DECAYS = (0.99, 0.995, 0.998)
ETAS = (1, 3)


def polynomial(eta: float):
    def update(averaged, current, n):
        w = (eta + 1.0) / (float(n) + 1.0 + eta)
        for a, c in zip(averaged, current):
            a.lerp_(c, w) if a.is_floating_point() else a.copy_(c)
    return update


def train(out: Path, overrides) -> None:
    from metatl.config import load_config
    from metatl.engine.trainer import Trainer, moving_average

    class Averages(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = {**{f"ema{d:g}": moving_average(self.learner, d) for d in DECAYS},
                          **{f"poly{e}": AveragedModel(self.learner, multi_avg_fn=polynomial(e), use_buffers=True)
                             for e in ETAS}}

        def step(self):
            metrics = super().step()
            for average in self.extra.values():
                average.update_parameters(self.learner)
            return metrics

        def save(self, name="last.pt"):
            path = super().save(name)
            if name.startswith("snapshot"):
                torch.save({k: a.module.state_dict() for k, a in self.extra.items()}, self.out / f"averages_{name}")
            return path

    Averages(load_config(MAML_5W1S, PROTOCOL + list(overrides)), out, progress=True).fit()


def score(run: Path, episodes: int = 600) -> list:
    from metatl.engine import checkpoint as ckpt_io
    from metatl.engine.build import build_sampler
    from metatl.engine.evaluator import evaluate
    from metatl.engine.trainer import load_trainer

    rows = []
    snaps = sorted(run.glob("snapshot_*min.pt"), key=lambda p: float(re.findall(r"[\d.]+", p.name)[0]))
    for snap in snaps:
        state = ckpt_io.load(snap)
        weights = {"raw": state["learner"], "ema0.999": state["averaged"], **ckpt_io.read(run / f"averages_{snap.name}")}
        trainer = load_trainer(snap, [], progress=False)
        for split in ("val", "test"):
            tasks = build_sampler(trainer.cfg.data, split)
            seed = trainer.cfg.eval.seed + (1 if split == "val" else 0)  # the trainer's validation seed
            for name, w in weights.items():
                trainer.learner.load_state_dict(w)
                r = evaluate(trainer.learner, tasks, episodes, seed, None, True, False)
                rows.append({"minutes": state["train_seconds"] / 60, "iteration": state["iteration"],
                             "split": split, "weights": name, "accuracy": r["mean"], "ci95": r["ci95"]})
                print(f"{rows[-1]['minutes']:5.2f} min  it {state['iteration']:5d}  {split:4s} {name:9s} "
                      f"{100 * r['mean']:.2f} +- {100 * r['ci95']:.2f}%", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "maml_5w1s_averages.json"))
    args = ap.parse_args()
    facts = machine(2)
    if not args.score_only:
        train(args.run, args.overrides)
    write_json(args.out, {"benchmark": "maml_averages", "protocol": PROTOCOL, **facts,
                          "runs": [{"run": str(args.run), "overrides": args.overrides, "episodes": args.episodes,
                                   "rows": score(args.run, args.episodes)}]})


if __name__ == "__main__":
    main()
