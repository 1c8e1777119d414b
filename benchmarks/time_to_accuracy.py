"""Time to accuracy: test accuracy (+- 95% CI, 600 fixed test episodes) of the snapshots a run
kept at chosen training minutes (``train.snapshot_minutes``), as JSON and a plot. A run that kept a
moving average of its weights (``train.ema_decay``) is scored twice, with the average and with the
raw weights, and both curves are plotted.

    metatl train configs/maml_omniglot_5w1s.yaml --out runs/maml_5w1s_tta \\
        --set train.time_budget_min=15 "train.snapshot_minutes=[2.5,5,7.5,10,12.5,15]" \\
              train.num_threads=1 algorithm.batch_tasks=true
    python benchmarks/time_to_accuracy.py runs/maml_5w1s_tta --out benchmarks/results/maml_5w1s_time_to_accuracy
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="output path without extension (.json and .png)")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--reference", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for scoring (eval.*)")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metatl.config import load_yaml
    from metatl.engine.trainer import hardware, load_trainer

    points = []
    snaps = sorted(args.run.glob("snapshot_*min.pt"), key=lambda p: float(re.findall(r"[\d.]+", p.name)[0]))
    for snap in snaps:
        trainer = load_trainer(snap, [f"eval.episodes={args.episodes}", *args.set], progress=False)
        trainer.out = Path(tempfile.mkdtemp())  # keep the run's own results.json; the numbers go to --out
        for weights in ("averaged", "raw") if trainer.ema is not None else ("raw",):
            trainer.cfg.eval.weights = weights  # what trainer.scored (and so test) uses
            res = trainer.test(checkpoint=str(snap))
            points.append({"minutes": trainer.train_seconds / 60, "iteration": trainer.iteration, "weights": weights,
                           "accuracy": res["metric"]["mean"], "ci95": res["metric"]["ci95"]})
            print(f"{points[-1]['minutes']:6.2f} min  it {trainer.iteration:6d}  {weights:8s} "
                  f"{100 * res['metric']['mean']:.2f} +- {100 * res['metric']['ci95']:.2f}%", flush=True)
    run_results = args.run / "results.json"  # the run's own record: versions, training length
    run = json.loads(run_results.read_text()) if run_results.exists() else {}
    config = args.run / "config.yaml"
    record = {"run": str(args.run), "episodes": args.episodes, "hardware": hardware(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": run.get("torch_version"),
              "metatl": run.get("metatl_version"), "train_seconds": run.get("train_seconds"),
              "iterations": run.get("iterations"), "overrides": args.set,
              "config": load_yaml(config.read_text()) if config.exists() else None, "points": points}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    kinds = sorted({p["weights"] for p in points})
    for weights in kinds:
        curve = [p for p in points if p["weights"] == weights]
        label = "metatl MAML" + (f", {weights} weights" if len(kinds) > 1 else "") + " (test, 600 episodes)"
        ax.errorbar([p["minutes"] for p in curve], [100 * p["accuracy"] for p in curve],
                    yerr=[100 * p["ci95"] for p in curve], marker="o", capsize=3, label=label)
    for r in args.reference:
        ax.axhline(100 * r, ls=":", color="gray")
    ax.set(xlabel="training minutes", ylabel="5-way 1-shot accuracy (%)", title=args.run.name)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
