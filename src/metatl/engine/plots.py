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


def sinusoid_tasks(learner, tasks, path, n_tasks: int = 3, seed: int = 1234, steps=(1, 10)) -> Path:
    """The MAML paper's figure: per test task the true curve, the K support points, and the
    prediction before adaptation and after 1 and 10 inner steps."""
    g = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3.4), squeeze=False)
    grid = torch.linspace(-5, 5, 200).unsqueeze(1)
    for ax in axes[0]:
        ep, (a, phi) = tasks.sample_task(g)
        ax.plot(grid, a * torch.sin(grid - phi), "k-", label="ground truth")
        ax.plot(ep.support_x, ep.support_y, "^", color="tab:purple", label=f"{len(ep.support_x)} points")
        for s, style in zip((0, *steps), (":", "--", "-")):
            ax.plot(
                grid,
                learner.adapt(ep.support_x, ep.support_y, steps=s)(grid),
                style,
                label="pre-update" if s == 0 else f"{s} grad step{'s' if s > 1 else ''}",
            )
        ax.set(xlabel="x", ylim=(-6, 6))
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
