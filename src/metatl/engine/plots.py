"""Plots written into the run folder (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def learning_curve(run_dir) -> Path:
    """``learning_curve.png``: training loss per iteration and validation metric (+- 95% CI)
    against training minutes."""
    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"  # absent when a run ended before its first log line
    records = [json.loads(line) for line in log.read_text().splitlines() if line] if log.exists() else []
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_ci95" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([r["iteration"] for r in train], [r["loss"] for r in train])
    axes[0].set(xlabel="iteration", ylabel="meta-training loss", yscale="log", title="training")
    if val:
        key = next(k for k in val[0] if k.startswith("val_") and k != "val_ci95")
        x = [r["train_minutes"] for r in val]
        y = [r[key] for r in val]
        ci = [r["val_ci95"] for r in val]
        axes[1].plot(x, y, marker="o")
        axes[1].fill_between(x, [a - b for a, b in zip(y, ci)], [a + b for a, b in zip(y, ci)], alpha=0.25)
        axes[1].set(xlabel="training minutes", ylabel=key.replace("_", " "), title="validation (+- 95% CI)")
    fig.tight_layout()
    path = run_dir / "learning_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def task_plots(learner, source, path, n_tasks: int = 3, seed: int = 1234) -> Path:
    """``n_tasks`` tasks of ``source`` side by side, each drawn by the source itself
    (``source.draw_task(ax, learner, generator)``, e.g. the sinusoid's true curve, support points
    and adapted predictions), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3.4), squeeze=False)
    for ax in axes[0]:
        source.draw_task(ax, learner, g)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
