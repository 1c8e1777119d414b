"""Meta-learned starting points for few-label fine-tuning, and transferability scores as rankers.

    python benchmarks/transferability.py                       # everything (sources, fine-tuning, ranking)
    python benchmarks/transferability.py --quick               # smoke version (tiny budgets, 1 seed)

Sources (each trained once into ``--runs``, reused when its ``last.pt`` is there), all 28x28,
1 channel, values in [0, 1] with ink = 1 (metatl's Omniglot convention; the digits with
``data.standardize: none``), so an Omniglot network reads digits as they are:

* Omniglot (Vinyals' 1,028 training characters x 4 rotations), MAML's conv net ``conv4_stride`` with
  batch-statistics BatchNorm, a wall-clock budget each (``--omniglot-minutes``): MAML 5-way 1-shot
  (the paper's settings), ProtoNet 5-way 1-shot (60-way training episodes), and plain supervised
  learning of one 4,112-way classifier (``pretrain`` with ``data.train_labels: class``, 64 classes a batch);
* digits networks trained by ``source_only`` on USPS (two budgets) and scikit-learn's digits, and a
  ``digits_cnn`` on USPS (another architecture);
* random initializations of both architectures.

Part 1, starting points (issue 26, section 3): every Omniglot start and the random one fine-tuned
(``finetune``, all layers, new 10-way head, SGD) on K = 1, 5, 10 labelled target images per class
(``data.target_labels_per_class``), target MNIST and USPS, ``--seeds`` draws of the labelled images;
accuracy on the target test images (``--max-target`` of them), mean and 95% CI over the draws.

Part 2, ranking (section 4): every source as a candidate for one target (``--rank-target``, K =
``--rank-shots``); LEEP, NCE, LogME and H-score on the very labelled images fine-tuning gets, then
the fine-tuned accuracy; Kendall's tau between each score and the accuracy over the candidates
(LEEP and NCE over the candidates with a classifier head).

Writes ``--out`` (JSON, with every run's command, budget and the hardware) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metatl.config import load_config
from metatl.data.digits import digits_splits, labelled_per_class
from metatl.engine.run import train_and_test
from metatl.engine.trainer import hardware
from metatl.registry import BACKBONES
from metatl.stats import mean_ci95
from metatl.transfer.transferability import score_model

REPO = Path(__file__).resolve().parents[1]
CONV4 = ["model.name=conv4_stride", "model.bn_mode=batch"]
DIGITS = ["data.standardize=none", "train.val_every=0", "train.momentum=0.9", "train.lr=0.05", "train.meta_batch=64"]


def omniglot_sources(minutes: float) -> dict:
    budget = [f"train.time_budget_min={minutes:g}", "train.iterations=100000", "eval.episodes=100", "train.seed=0"]
    return {
        "maml_omniglot": (
            "configs/maml_omniglot_5w1s.yaml",
            ["data.split=vinyals", *CONV4, *budget, "train.val_every=0"],
        ),
        "protonet_omniglot": (
            "configs/protonet_omniglot_5w1s_10min.yaml",
            [*CONV4, "train.precision=float32", *budget],
        ),
        "supervised_omniglot": (
            "configs/maml_omniglot_5w1s.yaml",
            [
                "algorithm={name: pretrain, inner_lr: 0.1, inner_steps_test: 3}",
                "data.split=vinyals",
                "data.train_ways=64",
                "data.train_shots=1",
                "data.train_queries=1",
                "data.train_labels=class",
                "train.meta_batch=1",
                *CONV4,
                *budget,
                "train.val_every=0",
            ],
        ),
    }


def digits_sources(scale: float) -> dict:
    it = lambda n: f"train.iterations={max(2, round(n * scale))}"  # noqa: E731
    usps, sk = ["data.direction=usps->mnist"], ["data.direction=sklearn_digits->mnist"]
    base = "configs/source_only_usps_mnist.yaml"
    return {
        "usps_30": (base, [*usps, *CONV4, *DIGITS, it(30)]),
        "usps_150": (base, [*usps, *CONV4, *DIGITS, it(150)]),
        "sklearn_50": (base, [*sk, *CONV4, *DIGITS, it(50)]),
        "usps_digits_cnn_100": (base, [*usps, "model.name=digits_cnn", *DIGITS, it(100)]),
    }


RANDOM = {"random_conv4": CONV4, "random_digits_cnn": ["model.name=digits_cnn"]}
OMNIGLOT_STARTS = ("random_conv4", "maml_omniglot", "protonet_omniglot", "supervised_omniglot")


def command(config: str, overrides: list[str], out: Path) -> str:
    quoted = " ".join(f'"{o}"' if (">" in o or " " in o) else o for o in overrides)
    return f"metatl train {config} --out {out} --set {quoted}"


def train_source(name: str, config: str, overrides: list[str], runs: Path) -> dict:
    out = runs / name
    overrides = [*overrides, "train.num_threads=1"]
    if not (out / "last.pt").exists():
        train_and_test(load_config(REPO / config, overrides), out, progress=False)
    res = json.loads((out / "results.json").read_text())
    return {
        "checkpoint": str(out / "last.pt"),
        "command": command(config, overrides, out),
        "iterations": res.get("iterations"),
        "train_seconds": res.get("train_seconds"),
        "own_test": res.get("metric", {}).get("mean"),
    }


def model_overrides(source: str) -> list[str]:
    return ["model.name=digits_cnn"] if "digits_cnn" in source else CONV4


def finetune_config(source: str, checkpoint: str | None, target: str, shots: int, seed: int, args) -> list[str]:
    other = "usps" if target == "mnist" else "mnist"  # the source half of the data is not used (labels: target)
    return [
        f"data.direction={other}->{target}",
        "data.standardize=none",
        "data.target_labels_fraction=0",
        f"data.target_labels_per_class={shots}",
        f"data.max_target={args.max_target}",
        f"data.max_source={args.max_target}",
        f"data.split_seed={seed}",
        "algorithm.reset_head=true",
        f"algorithm.init_checkpoint={checkpoint or 'null'}",
        *model_overrides(source),
        f"train.iterations={args.finetune_steps}",
        "train.meta_batch=64",
        "train.val_every=0",
        "train.ckpt_every=0",
        "train.log_every=1000",
        f"train.seed={seed}",
        "train.num_threads=1",
    ]


def finetune(source, checkpoint, target, shots, seed, args) -> dict:
    overrides = finetune_config(source, checkpoint, target, shots, seed, args)
    cfg = load_config(REPO / "configs/finetune_1pct_usps_mnist.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = train_and_test(cfg, Path(tmp), progress=False)
    return {
        "source": source,
        "target": target,
        "shots": shots,
        "seed": seed,
        "accuracy": res["metric"]["mean"],
        "seconds": time.perf_counter() - start,
        "command": command("configs/finetune_1pct_usps_mnist.yaml", overrides, Path("runs/ft")),
    }


def load_model(source: str, checkpoint: str | None, seed: int):
    """The source network (features + its own head) as a plain module in eval mode."""
    if checkpoint:
        from metatl.build import load_learner

        return load_learner(checkpoint).model
    torch.manual_seed(seed)  # a random start like the fine-tuning run's (same seed, not the same draw)
    name = "digits_cnn" if "digits_cnn" in source else "conv4_stride"
    kwargs = {} if name == "digits_cnn" else {"bn_mode": "batch"}
    return BACKBONES.get(name)(out_features=10, in_channels=1, image_size=28, **kwargs)


def labelled_rows(target: str, shots: int, seed: int, args):
    """The labelled target images fine-tuning gets for this draw (the same rows, by the same code)."""
    cfg = load_config(
        REPO / "configs/finetune_1pct_usps_mnist.yaml", finetune_config("", None, target, shots, seed, args)
    )
    x, y = digits_splits(cfg.data)["target_train"]
    rows = labelled_per_class(y, shots, seed)
    return x[rows], y[rows]


def kendall(scores: dict, acc: dict) -> dict:
    from scipy.stats import kendalltau

    out = {}
    for name in ("leep", "nce", "logme", "h_score"):
        keys = [k for k in acc if scores[k][name] is not None]
        tau = kendalltau([scores[k][name] for k in keys], [acc[k] for k in keys])
        out[name] = {"tau": float(tau.statistic), "p": float(tau.pvalue), "candidates": len(keys)}
    return out


def summary(runs: list[dict], group) -> dict:
    groups: dict = {}
    for r in runs:
        groups.setdefault(group(r), []).append(r["accuracy"])
    return {k: {**mean_ci95(v), "n": len(v)} for k, v in groups.items()}


def markdown(result: dict) -> str:
    """The tables of docs/transferability.md from the JSON this script writes
    (``python benchmarks/transferability.py --tables benchmarks/results/transferability.json``)."""
    st, lines = result["settings"], []
    table = result["starting_points"]["summary"]
    for target in st["targets"]:
        lines += [
            f"\n{target.upper()} test accuracy ({st['max_target']} test images), mean ± 95% CI over "
            f"{st['seeds']} draws of the labelled images:\n",
            "| start | " + " | ".join(f"K = {k}" for k in st["shots"]) + " |",
            "|---|" + "---:|" * len(st["shots"]),
        ]
        for source in OMNIGLOT_STARTS:
            cells = [table[f"{target}|{k}|{source}"] for k in st["shots"]]
            lines.append(f"| {source} | " + " | ".join(f"{c['mean']:.3f} ± {c['ci95']:.3f}" for c in cells) + " |")
    r = result["ranking"]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines += [
        f"\nRanking for {r['target'].upper()}, K = {r['shots']} labelled images per class (scores on those images, "
        f"means over {st['seeds']} draws):\n",
        "| source | iterations | fine-tuned accuracy | LEEP | NCE | LogME | H-score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for source in sorted(r["accuracy"], key=r["accuracy"].get, reverse=True):
        its = result["sources"].get(source, {}).get("iterations", 0)
        sc = r["scores"][source]
        lines.append(
            f"| {source} | {its} | {r['accuracy'][source]:.3f} | "
            + " | ".join(fmt(sc[k]) for k in ("leep", "nce", "logme", "h_score"))
            + " |"
        )
    tau = r["kendall_tau"]
    lines.append(
        "| **Kendall's tau** (p) | | | "
        + " | ".join(
            f"{tau[k]['tau']:.2f} ({tau[k]['p']:.2f}, {tau[k]['candidates']})"
            for k in ("leep", "nce", "logme", "h_score")
        )
        + " |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/transferability", help="where the source runs live")
    p.add_argument("--out", default="benchmarks/results/transferability.json")
    p.add_argument("--omniglot-minutes", type=float, default=6.0, help="training budget of each Omniglot source")
    p.add_argument("--targets", nargs="+", default=["mnist", "usps"])
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--max-target", type=int, default=2000, help="target training and test images used")
    p.add_argument("--rank-target", default="mnist")
    p.add_argument("--rank-shots", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="smoke version: tiny budgets, one seed")
    p.add_argument("--tables", metavar="JSON", help="only print the markdown tables of a written JSON")
    args = p.parse_args(argv)
    if args.tables:
        print(markdown(json.loads(Path(args.tables).read_text())))
        return 0
    scale = 1.0
    if args.quick:
        args.omniglot_minutes, args.seeds, args.finetune_steps, args.max_target, scale = 0.1, 1, 5, 200, 0.1
        args.shots, args.targets = [1], ["mnist"]
        args.rank_shots = min(args.rank_shots, 10)  # 200 target rows hold about 20 per class
    runs = Path(args.runs)
    t0 = time.perf_counter()

    sources = {}
    for name, (config, overrides) in {**omniglot_sources(args.omniglot_minutes), **digits_sources(scale)}.items():
        sources[name] = train_source(name, config, overrides, runs)
        print(f"source {name}: {sources[name]['iterations']} iterations, own test {sources[name]['own_test']}")
    checkpoint = {k: v["checkpoint"] for k, v in sources.items()} | dict.fromkeys(RANDOM)

    # part 1: starting points for few-label fine-tuning
    starts = []
    for target in args.targets:
        for shots in args.shots:
            for seed in range(args.seeds):
                for source in OMNIGLOT_STARTS:
                    starts.append(finetune(source, checkpoint[source], target, shots, seed, args))
                    print({k: starts[-1][k] for k in ("source", "target", "shots", "seed", "accuracy", "seconds")})
    table = summary(starts, lambda r: f"{r['target']}|{r['shots']}|{r['source']}")

    # part 2: ranking every source for one target
    ranking = []
    for source in checkpoint:
        for seed in range(args.seeds):
            prior = [
                r
                for r in starts
                if (r["source"], r["target"], r["shots"], r["seed"])
                == (source, args.rank_target, args.rank_shots, seed)
            ]
            run = (
                prior[0]
                if prior
                else finetune(source, checkpoint[source], args.rank_target, args.rank_shots, seed, args)
            )
            x, y = labelled_rows(args.rank_target, args.rank_shots, seed, args)
            scores = score_model(load_model(source, checkpoint[source], seed), x, y)
            ranking.append({**run, "scores": scores})
            print(source, seed, run["accuracy"], scores)
    mean_acc = {s: float(np.mean([r["accuracy"] for r in ranking if r["source"] == s])) for s in checkpoint}
    mean_scores = {
        s: {
            k: (
                None if ranking_rows[0]["scores"][k] is None else float(np.mean([r["scores"][k] for r in ranking_rows]))
            )
            for k in ("leep", "nce", "logme", "h_score")
        }
        for s in checkpoint
        for ranking_rows in [[r for r in ranking if r["source"] == s]]
    }
    result = {
        "benchmark": "transferability",
        "command": "python benchmarks/transferability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items()},
        "sources": sources,
        "starting_points": {"runs": starts, "summary": table},
        "ranking": {
            "target": args.rank_target,
            "shots": args.rank_shots,
            "runs": ranking,
            "accuracy": mean_acc,
            "scores": mean_scores,
            "kendall_tau": kendall(mean_scores, mean_acc),
        },
        "wall_seconds": time.perf_counter() - t0,
        "hardware": {"cpu": hardware("cpu"), "python": platform.python_version(), "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {out} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
