"""The Omniglot results table of docs/metric.md: train every metric-learning config under a time
budget, test it on the 1000 fixed test episodes, and collect the ``results.json`` files.

    python benchmarks/metric_results.py --budget-min 60              # train + test all 12 runs
    python benchmarks/metric_results.py --only protonet_omniglot_5w1s --budget-min 10
    python benchmarks/metric_results.py --collect                    # only rebuild the table

Each run is ``metatl train configs/<name>.yaml --out runs/metric/<name> --set
train.time_budget_min=<budget> --no-progress`` (training stops at the budget or at the config's
iteration count, whichever comes first; the trainer then runs the test episodes). A finished run
(results.json present) is skipped unless ``--force``. The table goes to stdout and to
benchmarks/results/metric_results.md, the numbers to benchmarks/results/metric_results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"protonet": "Prototypical Networks", "matching": "Matching Networks", "relation": "Relation Network"}
SETTINGS = ("5w1s", "5w5s", "20w1s", "20w5s")
PUBLISHED = {  # accuracy %, Omniglot, as reported in each paper
    "protonet": (98.8, 99.7, 96.0, 98.9),  # Snell et al. 2017, Table 1
    "matching": (98.1, 98.9, 93.8, 98.5),  # Vinyals et al. 2016, Table 1 (no fine-tuning)
    "relation": (99.6, 99.8, 97.6, 99.1),  # Sung et al. 2018, Table 1
}


def run_names():
    return [f"{m}_omniglot_{s}" for m in METHODS for s in SETTINGS]


def train(name: str, budget: float, runs: Path, extra) -> int:
    cmd = [sys.executable, "-m", "metatl.cli", "train", str(ROOT / "configs" / f"{name}.yaml"),
           "--out", str(runs / name), "--no-progress", "--overwrite", "--set", f"train.time_budget_min={budget}", *extra]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def collect(runs: Path) -> dict:
    table = {}
    for name in run_names():
        path = runs / name / "results.json"
        if path.exists():
            r = json.loads(path.read_text())
            table[name] = {"mean": 100 * r["metric"]["mean"], "ci95": 100 * r["metric"]["ci95"],
                           "episodes": r["episodes"], "iterations": r["iterations"],
                           "train_minutes": r["train_seconds"] / 60, "hardware": r["hardware"]}
    return table


def markdown(table: dict) -> str:
    head = "| method | " + " | ".join("{}-way {}-shot".format(*s[:-1].split("w")) for s in SETTINGS) + " |"
    lines = [head, "|---|" + "---|" * len(SETTINGS)]
    for m, title in METHODS.items():
        lines.append(f"| {title} (published) | " + " | ".join(f"{v:.1f}" for v in PUBLISHED[m]) + " |")
        cells = []
        for s in SETTINGS:
            r = table.get(f"{m}_omniglot_{s}")
            cells.append(f"{r['mean']:.1f} +- {r['ci95']:.1f} ({r['train_minutes']:.0f} min, {r['iterations']} it)"
                         if r else "not yet run")
        lines.append(f"| {title} (metatl) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-min", type=float, default=60.0, help="training minutes per run")
    p.add_argument("--only", nargs="+", help="run only these config names")
    p.add_argument("--runs", default=str(ROOT / "runs" / "metric"), help="folder of the run folders")
    p.add_argument("--collect", action="store_true", help="do not train; only collect results")
    p.add_argument("--force", action="store_true", help="train again even when results.json exists")
    p.add_argument("--set", nargs="+", default=[], help="extra overrides for every run, e.g. train.device=cuda")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    failed = []
    if not args.collect:
        for name in args.only or run_names():
            if (runs / name / "results.json").exists() and not args.force:
                print(f"{name}: done, skipping (--force to redo)")
                continue
            if train(name, args.budget_min, runs, ["--set", *args.set] if args.set else []) != 0:
                failed.append(name)
    table = collect(runs)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric_results.json").write_text(json.dumps({"published": PUBLISHED, "ours": table}, indent=2))
    text = markdown(table)
    (out / "metric_results.md").write_text(text + "\n")
    print(text)
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
