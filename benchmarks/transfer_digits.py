"""Deep domain adaptation among MNIST, USPS and scikit-learn's digits, with label-free model selection.

    python benchmarks/transfer_digits.py --device cuda --protocol holdout --seeds 0 1 2 --workdir DIR
                                  # the results page's grid (60 runs): results/transfer_digits.json
    python benchmarks/transfer_digits.py --methods dann --directions usps->mnist --out FILE
    python benchmarks/transfer_digits.py --quick          # tiny smoke version (a minute on a free CPU)

With ``--workdir`` each finished run is recorded there and reused; several processes (one per
direction and seed, say) can fill one folder at once, and ``--cached-only`` then gathers it.

Protocol (skada-bench's, as in configs/*mnist_usps*): ``digits_cnn``, USPS padded into 28x28,
per-domain standardization, SGD lr .1 momentum .6 weight decay 1e-5 (DANN lr .01 momentum .9),
256 source + 256 target rows a step, 10 epochs (of the larger domain for the adaptation methods,
of the source for source only), last iterate. ``--protocol official`` scores on the target test
split; ``holdout`` on 20% of the target training split held out (skada-bench's table).

Selection: DANN, Deep CORAL and DAN train once per weight in their grid. Every trained network is
scored without target labels (:mod:`metatl.transfer.deep_selection`: IWV, DEV, prediction entropy,
SND) on held-out source rows and unlabelled target training rows; each scorer picks a weight, and
the target accuracy of that pick is reported. ``oracle`` is the weight the target test labels would
pick (the best accuracy in the grid): a bound, not a result a user can reach. Writes every run,
the picks and the hardware to ``--out`` (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from metatl.config import from_dict
from metatl.data.digits import DIRECTIONS, digits_splits
from metatl.engine.trainer import Trainer, check_device, hardware
from metatl.transfer.deep_selection import SCORERS, label_free_scores, select

METHODS = {
    "source_only": {"name": "source_only"},
    "dann": {"name": "dann", "gamma": 10.0},
    "deep_coral": {"name": "deep_coral"},
    "dan": {"name": "dan", "estimator": "unbiased"},
}
GRIDS = {"dann": [0.01, 0.1, 1.0], "deep_coral": [0.1, 1.0, 10.0], "dan": [0.1, 1.0, 10.0]}
OPTIM = {
    "default": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.6, "weight_decay": 1e-5},
    "dann": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5},
}
TRAIN_ROWS = {"mnist": 60000, "usps": 7291, "sklearn_digits": 1198}
PRIMARY = "dev"  # the scorer of the "label-free" column (skada-bench's DEV rows)
# skada-bench (Lalou et al. 2024), scored on 20% of the target training split: DEV-selected and
# target-label-selected ("supervised") rows, MNIST->USPS / USPS->MNIST (issue 24)
SKADA_BENCH_DEV = {
    "mnist->usps": {"source_only": 0.942, "dann": 0.936, "deep_coral": 0.964, "dan": 0.962},
    "usps->mnist": {"source_only": 0.734, "dann": 0.870, "deep_coral": 0.878, "dan": 0.860},
}


def iterations_for(method: str, direction: str, epochs: float, batch: int) -> int:
    source, target = direction.split("->")
    rows = TRAIN_ROWS[source] if method == "source_only" else max(TRAIN_ROWS[source], TRAIN_ROWS[target])
    return max(1, math.ceil(epochs * rows / batch))


def run_config(method, direction, seed, weight, args) -> dict:
    algo = dict(METHODS[method])
    if weight is not None:
        algo["weight"] = weight
    iterations = args.iterations or iterations_for(method, direction, args.epochs, args.batch)
    tag = "" if weight is None else f"_w{weight:g}"
    return {
        "name": f"{method}{tag}_{direction.replace('->', '_')}_s{seed}",
        "algorithm": algo,
        "model": {"name": "digits_cnn"},
        "data": {
            "name": "mnist_usps",
            "direction": direction,
            "image_size": args.image_size,
            "data_dir": args.data_dir,
            "max_source": args.max_rows,
            "max_target": args.max_rows,
            "usps_frame": args.usps_frame,
            "standardize": "domain",
            "test_protocol": args.protocol,
        },
        "train": {
            "iterations": iterations,
            "meta_batch": args.batch,
            **OPTIM.get(method, OPTIM["default"]),
            "val_every": 0,
            "ckpt_every": 0,
            "log_every": 100,
            "seed": seed,
            "device": args.device,
        },
    }


def one_run(method, direction, seed, weight, args, workdir) -> dict:
    raw = run_config(method, direction, seed, weight, args)
    start = time.perf_counter()
    cfg = from_dict(raw)
    trainer = Trainer(cfg, Path(workdir) / raw["name"], progress=False)
    trainer.fit()
    res = trainer.test()
    train_wall = time.perf_counter() - start
    parts = digits_splits(cfg.data)  # held-out labelled source rows, unlabelled target training rows
    g = torch.Generator().manual_seed(seed)
    xs, ys = parts["source_test"]
    xt = parts["target_train"][0]
    i = torch.randperm(len(xs), generator=g)[: args.selection_rows]
    j = torch.randperm(len(xt), generator=g)[: args.selection_rows]
    scores = label_free_scores(trainer.learner, xs[i], ys[i], xt[j])
    return {
        "method": method,
        "direction": direction,
        "seed": seed,
        "weight": weight,
        "accuracy": res["metric"]["mean"],
        "test_images": res["episodes"],
        "scores": scores,
        "iterations": trainer.iteration,
        "train_seconds": trainer.train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "train_and_test_seconds": train_wall,
        "hardware": hardware(str(trainer.device)),
        "date": time.strftime("%Y-%m-%d"),
        "config": raw,
    }


RECORD = "benchmark_run.json"  # a finished run's record, beside its run folder under --workdir


def same_run(a: dict, b: dict) -> bool:
    """Two run configs compute the same thing (where the data is read from, and on which device
    the run was asked to go, do not change what a finished run measured)."""
    strip = lambda c: {**c, "data": {**c["data"], "data_dir": None}, "train": {**c["train"], "device": None}}  # noqa: E731
    return strip(a) == strip(b)


def cached_or_run(method, direction, seed, weight, args, workdir, cached_only=False) -> tuple[dict | None, bool]:
    """The run's record from an earlier invocation with the same ``--workdir`` and config, or a new
    run, recorded (atomically) as soon as it ends: a grid of hours can be run in parts, or by
    several processes at once, and then gathered with ``--cached-only`` (``None``: not recorded)."""
    raw = run_config(method, direction, seed, weight, args)
    path = Path(workdir) / raw["name"] / RECORD
    if path.exists():
        record = json.loads(path.read_text())
        if same_run(record["config"], raw):
            return record, True
    if cached_only:
        return None, False
    record = one_run(method, direction, seed, weight, args, workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record, False


def pick(runs) -> dict:
    """Per method / direction / seed: the accuracy each scorer's choice reaches, and the oracle's."""
    out = {}
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["direction"], r["seed"]), []).append(r)
    for (m, d, s), cands in groups.items():
        entry = {"grid": [c["weight"] for c in cands], "accuracy_by_weight": [c["accuracy"] for c in cands]}
        for scorer in SCORERS:
            c = select(cands, scorer)
            entry[scorer] = {"weight": c["weight"], "accuracy": c["accuracy"]}
        best = max(cands, key=lambda c: c["accuracy"])
        entry["oracle"] = {"weight": best["weight"], "accuracy": best["accuracy"]}
        out.setdefault(m, {}).setdefault(d, {})[str(s)] = entry
    return out


def summarise(picks) -> dict:
    out = {}
    for m, by_d in picks.items():
        for d, by_seed in by_d.items():
            row = {}
            for key in (*SCORERS, "oracle"):
                v = [e[key]["accuracy"] for e in by_seed.values()]
                row[key] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            out.setdefault(m, {})[d] = row
    return out


def table(summary, directions, protocol) -> str:
    head = (
        "| method | "
        + " | ".join(
            f"{d} {k}" for d in directions for k in ("label-free (DEV)", "oracle (target labels)", "skada-bench DEV")
        )
        + " |"
    )
    lines = [head, "|---|" + "---:|" * (3 * len(directions))]
    for m in METHODS:
        cells = []
        for d in directions:
            s = summary.get(m, {}).get(d)
            fmt = lambda v: f"{v['mean']:.3f} ± {v['std']:.3f} (n={v['n']})"  # noqa: E731
            cells += [fmt(s[PRIMARY]), fmt(s["oracle"])] if s else ["not run", "not run"]
            ref = SKADA_BENCH_DEV.get(d, {}).get(m)
            cells.append(f"{ref:.3f}" + ("" if protocol == "holdout" else " (holdout split)") if ref else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--directions", nargs="+", default=["mnist->usps", "usps->mnist"], choices=DIRECTIONS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--grid", nargs="+", default=[], metavar="METHOD=W1,W2", help="override a method's weight grid, e.g. dann=0.1,1"
    )
    p.add_argument("--protocol", choices=("official", "holdout"), default="official")
    p.add_argument("--usps-frame", choices=("pad", "stretch"), default="pad")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--iterations", type=int, default=None, help="steps per run (default: from --epochs)")
    p.add_argument("--batch", type=int, default=256, help="rows per domain per step")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--max-rows", type=int, default=None, help="cap the rows of every split (quick runs)")
    p.add_argument("--selection-rows", type=int, default=2000, help="source and target rows for the scorers")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 300 rows, 20 steps, 2-point grids")
    p.add_argument(
        "--workdir",
        default=None,
        help="run folders (default: a temporary folder); each finished run's record is kept there and "
        "reused by a later invocation with the same folder and settings, so a long grid can run in parts",
    )
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: report the runs recorded in --workdir (e.g. by several processes, one per seed)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="the JSON to write; default benchmarks/results/transfer_digits.json, which the results page is "
        "generated from (with --quick: a file in the temporary folder)",
    )
    args = p.parse_args(argv)
    grids = dict(GRIDS)
    for item in args.grid:
        name, _, values = item.partition("=")
        if name not in GRIDS or not values:
            p.error(f"--grid {item!r}: use METHOD=W1,W2 with METHOD one of {', '.join(GRIDS)}.")
        grids[name] = [float(v) for v in values.split(",")]
    if args.quick:
        args.seeds, args.iterations, args.max_rows, args.selection_rows = args.seeds[:1], 20, 300, 300
        grids = {m: g[:2] for m, g in grids.items()}
    if args.out is None:
        quick = Path(tempfile.gettempdir()) / "transfer_digits_quick.json"
        args.out = str(quick) if args.quick else "benchmarks/results/transfer_digits.json"
    if args.cached_only and not args.workdir:
        p.error("--cached-only reports the runs recorded in --workdir; name that folder.")
    device = check_device(args.device)
    start = time.perf_counter()
    runs, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        for direction in args.directions:
            for seed in args.seeds:
                for method in (m for m in METHODS if m in args.methods):
                    for weight in grids.get(method, [None]):
                        r, reused = cached_or_run(method, direction, seed, weight, args, workdir, args.cached_only)
                        if r is None:
                            missing.append({"method": method, "direction": direction, "seed": seed, "weight": weight})
                            print(
                                f"{method:<11} w={weight!s:<5} {direction:<22} seed {seed}: not recorded in --workdir"
                            )
                            continue
                        runs.append(r)
                        scores = " ".join(f"{k} {v:.4f}" for k, v in r["scores"].items())
                        print(
                            f"{method:<11} w={weight!s:<5} {direction:<22} seed {seed}: accuracy "
                            f"{r['accuracy']:.4f}  {scores}  train {r['train_seconds']:.0f}s  "
                            f"wall {r['wall_seconds']:.0f}s" + (" (recorded earlier in --workdir)" if reused else ""),
                            flush=True,
                        )
    total = time.perf_counter() - start
    picks = pick(runs)
    summary = summarise(picks)
    result = {
        "command": " ".join(
            [
                "python",
                "benchmarks/transfer_digits.py",
                *(f'"{a}"' if ">" in a else a for a in (argv if argv is not None else sys.argv[1:])),
            ]
        ),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "grids": grids,
        "model_selection": f"per scorer, the grid weight with the greatest label-free score ({', '.join(SCORERS)}); "
        f"'oracle' uses the target test labels and is a bound, not a usable result",
        "hardware": {
            "device": str(device),
            "cpu": hardware(str(device)),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "total_wall_seconds": total,
        "runs_wall_seconds": sum(r["wall_seconds"] for r in runs),  # one after another; less in parallel
        "missing": missing,  # with --cached-only: runs not recorded in --workdir, left out of the picks
        "summary": summary,
        "picks": picks,
        "reference_skada_bench_dev": SKADA_BENCH_DEV,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(table(summary, args.directions, args.protocol))
    print(f"\n{len(runs)} runs in {total:.0f} s on {result['hardware']['cpu']}; wrote {out}")
    if missing:
        print(f"{len(missing)} runs not recorded in --workdir: their methods' picks cover part of the grid")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
