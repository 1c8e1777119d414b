"""Learned LSTM optimizer (Andrychowicz et al. 2016) against SGD, RMSprop and Adam.

1. Meta-train one optimizer on random 10-d quadratics ``f(theta) = ||W theta - y||^2`` and one on an
   MLP (one hidden layer of 20 sigmoid units) classifying MNIST minibatches of 128, each by truncated
   unrolling (``--unroll`` steps in truncations of ``--truncation``).
2. Tune the learning rate of SGD, RMSprop and Adam over ``--lrs`` on ``--tune-seeds`` problems
   (lowest mean loss over the run; a diverging learning rate is marked and never chosen).
3. Run every optimizer ``--steps`` steps on ``--seeds`` fresh problems and average the loss curves:
   quadratics, the MNIST MLP, and the paper's generalisation variants with the MNIST-trained
   optimizer: 40 hidden units, two hidden layers, ReLU.

Writes ``learned_optimizer.json`` (curves, chosen learning rates, meta-training history) and
``learned_optimizer.png`` to ``--out``. Without MNIST in the data folder the MNIST problems are
skipped (and the JSON says so).

    full (about 30-60 min on one CPU core):
    OMP_NUM_THREADS=1 python benchmarks/learned_optimizer.py
    tiny check (< 90 s):
    OMP_NUM_THREADS=1 python benchmarks/learned_optimizer.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from metatl.meta.learned_optimizer import LearnedOptimizer, MLPProblem, QuadraticProblem, meta_train, unroll
from metatl.meta.rules import SGD, Adam
from metatl.stats import mean_ci95

ROOT = Path(__file__).resolve().parents[1]


class RMSprop:
    """As ``torch.optim.RMSprop`` (alpha 0.99, eps 1e-8): ``v <- a v + (1-a) g^2``; ``theta -= lr g / (sqrt(v) + eps)``."""

    def __init__(self, lr: float, alpha: float = 0.99, eps: float = 1e-8):
        self.lr, self.alpha, self.eps = lr, alpha, eps

    def init(self, params):
        return {k: torch.zeros_like(p) for k, p in params.items()}

    def update(self, grads, state, params):
        v = {k: self.alpha * state[k] + (1 - self.alpha) * g * g for k, g in grads.items()}
        return {k: -self.lr * g / (v[k].sqrt() + self.eps) for k, g in grads.items()}, v


BASELINES = {"SGD": SGD, "RMSprop": RMSprop, "Adam": Adam}


def run(rule, problem, steps: int) -> np.ndarray:
    """Loss curve ``f(theta_t)``, ``t = 0..steps``; NaN from the first non-finite loss on (diverged)."""
    params, state = problem.init_params(), rule.init(problem.init_params())
    curve = np.full(steps + 1, np.nan)
    for t in range(steps):
        params, state, losses = unroll(rule, problem, params, state, 1, meta=False)
        if not math.isfinite(losses[0].item()):
            return curve
        curve[t] = losses[0].item()
    with torch.no_grad():
        final = problem.loss(params).item()
    curve[steps] = final if math.isfinite(final) else np.nan
    return curve


def mnist_data():
    try:
        from metatl.data.digits import load_mnist

        x, y = load_mnist("train")
        return torch.from_numpy(x).float(), torch.from_numpy(y).long()
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"MNIST unavailable ({err}); skipping the MNIST problems")
        return None


def make_families(mnist, batch: int):
    fams = {"quadratic": (lambda g: QuadraticProblem(generator=g), "quadratic")}
    if mnist is not None:
        x, y = mnist
        for name, hidden, act in (
            ("mnist_mlp", (20,), "sigmoid"),
            ("mnist_40_hidden", (40,), "sigmoid"),
            ("mnist_2_layers", (20, 20), "sigmoid"),
            ("mnist_relu", (20,), "relu"),
        ):
            fams[name] = ((lambda g, h=hidden, a=act: MLPProblem(x, y, h, a, batch, 10, generator=g)), "mnist_mlp")
    return fams


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny version (< 90 s on one core)")
    p.add_argument(
        "--meta-iterations",
        type=int,
        default=None,
        help="problems to meta-train on (default 300 quadratic / 200 MNIST)",
    )
    p.add_argument("--unroll", type=int, default=100)
    p.add_argument("--truncation", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--tune-seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    p.add_argument("--meta-lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--only", nargs="+", help="run only these problems (e.g. quadratic); the files get their names")
    args = p.parse_args(argv)
    if args.quick:
        args.unroll, args.truncation, args.steps, args.seeds, args.tune_seeds = 20, 10, 20, 2, 1
        args.lrs = [1e-2, 0.1, 1.0]
        iters = {"quadratic": 40, "mnist_mlp": 3}
    else:
        iters = {"quadratic": 300, "mnist_mlp": 200}
    if args.meta_iterations:
        iters = {k: args.meta_iterations for k in iters}
    torch.manual_seed(0)
    start = time.time()
    families = make_families(mnist_data(), args.batch)
    if args.only:
        families = {k: v for k, v in families.items() if k in args.only}
    results = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "meta_iterations": iters,
        "mnist": "mnist_mlp" in families,
        "torch_version": torch.__version__,
        "problems": {},
        "meta_training": {},
    }

    learned = {}
    for trained_on in sorted({src for _, src in families.values()}):
        sample, _ = families[trained_on]
        rule = LearnedOptimizer()
        t0 = time.time()
        hist = meta_train(rule, sample, iters[trained_on], args.unroll, args.truncation, lr=args.meta_lr, seed=0)
        hist["seconds"] = time.time() - t0
        results["meta_training"][trained_on] = hist
        print(
            f"meta-trained on {trained_on}: {iters[trained_on]} problems in {hist['seconds']:.0f}s, "
            f"meta-loss {hist['meta_loss'][0]:.3g} -> {hist['meta_loss'][-1]:.3g}, "
            f"{hist['clipped']}/{hist['truncations']} meta-gradients clipped",
            flush=True,
        )
        learned[trained_on] = rule.eval()

    for name, (sample, trained_on) in families.items():
        problems = lambda seeds, base, sample=sample: [
            sample(torch.Generator().manual_seed(base + s)) for s in range(seeds)
        ]  # noqa: E731
        entry = {"trained_on": trained_on, "curves": {}, "lr": {}, "diverged": {}}
        for opt_name, cls in BASELINES.items():
            tune = {}
            for lr in args.lrs:
                curves = np.stack([run(cls(lr=lr), prob, args.steps) for prob in problems(args.tune_seeds, 10_000)])
                tune[lr] = float(np.mean(curves)) if np.isfinite(curves).all() else math.inf
            best = min(tune, key=tune.get)
            entry["lr"][opt_name] = best
            entry["diverged"][opt_name + "_lrs"] = [lr for lr, v in tune.items() if not math.isfinite(v)]
            entry["curves"][opt_name] = np.stack(
                [run(cls(lr=best), prob, args.steps) for prob in problems(args.seeds, 0)]
            )
        entry["curves"]["LSTM"] = np.stack(
            [run(learned[trained_on], prob, args.steps) for prob in problems(args.seeds, 0)]
        )
        entry["diverged"]["LSTM_runs"] = int(np.isnan(entry["curves"]["LSTM"]).any(1).sum())
        # each seed's mean loss over the steps (the meta-objective); mean +- 95% CI over the seeds
        per_run = {k: np.nanmean(c, 1) for k, c in entry["curves"].items()}
        best = min(BASELINES, key=lambda k: float(np.nanmean(per_run[k])))
        diff = per_run["LSTM"] - per_run[best]  # paired over the same problems
        paired = mean_ci95(diff)
        entry["lstm_minus_best"] = {
            "baseline": best,
            "mean": paired["mean"],
            "ci95": paired["ci95"],
            "lstm_lower_on": int((diff < 0).sum()),
            "seeds": len(diff),
        }
        for k, c in entry["curves"].items():
            final, run_mean = mean_ci95(c[:, -1]), mean_ci95(per_run[k])
            entry["curves"][k] = {
                "mean": np.nanmean(c, 0).tolist(),
                "std": np.nanstd(c, 0).tolist(),
                "final_mean": final["mean"],
                "final_ci95": final["ci95"],
                "run_mean": run_mean["mean"],
                "run_mean_ci95": run_mean["ci95"],
            }
        results["problems"][name] = entry
        print(
            f"{name:<16} mean loss over the run "
            + "  ".join(f"{k} {v['run_mean']:.4g}+-{v['run_mean_ci95']:.2g}" for k, v in entry["curves"].items())
            + "; final loss "
            + "  ".join(f"{k} {v['final_mean']:.4g}" for k, v in entry["curves"].items())
            + f"  (lr: {entry['lr']})",
            flush=True,
        )
        d = entry["lstm_minus_best"]
        print(
            f"{'':<16} LSTM minus {d['baseline']}, paired: {d['mean']:.4g} +- {d['ci95']:.2g}; "
            f"LSTM lower on {d['lstm_lower_on']}/{d['seeds']} problems",
            flush=True,
        )

    results["seconds"] = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "learned_optimizer_quick" if args.quick else "learned_optimizer"
    if args.only:
        stem += "_" + "_".join(args.only)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'} in {results['seconds']:.0f}s")
    return 0


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = results["problems"]
    fig, axes = plt.subplots(1, len(probs), figsize=(4 * len(probs), 3.4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], probs.items()):
        for opt, c in entry["curves"].items():
            label = opt if opt == "LSTM" else f"{opt} (lr {entry['lr'][opt]:g})"
            ax.plot(c["mean"], label=label, lw=2 if opt == "LSTM" else 1)
        ax.set_yscale("log")
        ax.set_title(f"{name}\n(LSTM trained on {entry['trained_on']})", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"loss, mean of {results['settings']['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
