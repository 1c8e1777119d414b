"""Deep domain adaptation on MNIST <-> USPS: every method x direction x seed through the one trainer.

    python benchmarks/transfer_digits.py --device cuda --seeds 0 1 2 --out benchmarks/results/transfer_digits.json
    python benchmarks/transfer_digits.py --device cpu --quick        # tiny smoke version (< 1 min on a free CPU)

Methods: source only, DANN, Deep CORAL, DAN, and fine-tuning the source-only network on 1% of the
target training labels (class-stratified). Small CNN (``digits_cnn``), 28x28 grayscale, full
training splits (source labelled, target unlabelled), the data held on the device; scored on the
full target test split. No target labels are used to choose anything: every method runs with the
fixed hyper-parameters below (the papers' defaults: DANN gamma = 10, loss weights 1), the last
iterate is scored. Writes per-run accuracy, mean +- std over seeds, wall times, DANN training
throughput (samples/s) and the hardware to ``--out``, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from metatl.config import from_dict
from metatl.engine.trainer import Trainer, hardware

METHODS = {  # name -> algorithm section (finetune_1pct also reveals 1% of the target labels)
    "source_only": {"name": "source_only"},
    "dann": {"name": "dann", "weight": 1.0, "gamma": 10.0},
    "deep_coral": {"name": "deep_coral", "weight": 1.0},
    "dan": {"name": "dan", "weight": 1.0, "estimator": "unbiased"},
    "finetune_1pct": {"name": "finetune", "strategy": "all", "labels": "target"},
}
DIRECTIONS = ("mnist->usps", "usps->mnist")
# skada-bench (small CNN, full data), target test accuracy
REFERENCE = {"mnist->usps": {"source_only": 0.942, "dann": 0.926, "deep_coral": 0.971, "dan": 0.950, "target_only": 0.981},
             "usps->mnist": {"source_only": 0.734, "dann": 0.868, "deep_coral": 0.899, "dan": 0.863}}


def run_config(method, direction, seed, args, init_checkpoint=None) -> dict:
    algo = dict(METHODS[method])
    data = {"name": "mnist_usps", "direction": direction, "image_size": args.image_size, "data_dir": args.data_dir,
            "max_source": args.max_rows, "max_target": args.max_rows}
    iterations = args.iterations
    if method == "finetune_1pct":
        algo["init_checkpoint"] = init_checkpoint
        data["target_labels_fraction"] = 0.01
        iterations = args.finetune_iterations
    return {"name": f"{method}_{direction.replace('->', '_')}_s{seed}", "algorithm": algo, "model": {"name": "digits_cnn"},
            "data": data, "train": {"iterations": iterations, "meta_batch": args.batch, "optimizer": "adam",
                                    "lr": args.lr, "val_every": 0, "ckpt_every": 0, "log_every": 100,
                                    "seed": seed, "device": args.device}}


def one_run(method, direction, seed, args, workdir, init_checkpoint=None) -> dict:
    raw = run_config(method, direction, seed, args, init_checkpoint)
    start = time.perf_counter()
    trainer = Trainer(from_dict(raw), Path(workdir) / raw["name"], progress=False)
    trainer.fit()
    res = trainer.test()
    wall = time.perf_counter() - start
    rows_per_step = args.batch * (1 if method in ("source_only", "finetune_1pct") else 2)
    return {"method": method, "direction": direction, "seed": seed, "accuracy": res["metric"]["mean"],
            "ci95": res["metric"]["ci95"], "test_images": res["episodes"], "iterations": trainer.iteration,
            "train_seconds": trainer.train_seconds, "wall_seconds": wall,
            "samples_per_s": trainer.iteration * rows_per_step / max(trainer.train_seconds, 1e-9),
            "checkpoint": str(Path(workdir) / raw["name"] / "last.pt"), "config": raw}


def summarise(runs) -> dict:
    out = {}
    for r in runs:
        out.setdefault(r["method"], {}).setdefault(r["direction"], []).append(r["accuracy"])
    return {m: {d: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
                for d, v in by.items()} for m, by in out.items()}


def table(summary, directions) -> str:
    head = "| method | " + " | ".join(f"{d.replace('->', ' -> ').upper()} (ours)" + f" | {d.replace('->', ' -> ').upper()} (skada-bench)"
                                       for d in directions) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(directions))]
    for m in METHODS:
        cells = []
        for d in directions:
            s = summary.get(m, {}).get(d)
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})" if s else "not run")
            ref = REFERENCE.get(d, {}).get(m)
            cells.append(f"{ref:.3f}" if ref is not None else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--iterations", type=int, default=2000, help="training steps per run (default 2000)")
    p.add_argument("--finetune-iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=256, help="rows per domain per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--max-rows", type=int, default=None, help="cap the rows of every split (quick runs)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run: 1 seed, 16x16, 256 rows, 5 steps")
    p.add_argument("--workdir", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--out", default="benchmarks/results/transfer_digits.json")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.iterations, args.finetune_iterations = args.seeds[:1], 5, 5
        args.batch, args.image_size, args.max_rows = 32, 16, 256
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("--device cuda but no CUDA device is visible; use --device cpu --quick", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
    if "finetune_1pct" in args.methods and "source_only" not in args.methods:
        p.error("finetune_1pct starts from the source_only run: keep source_only in --methods.")
    order = [m for m in METHODS if m in args.methods]  # source_only first
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        for direction in args.directions:
            for seed in args.seeds:
                for method in order:
                    init = next((r["checkpoint"] for r in runs if r["method"] == "source_only"
                                 and r["direction"] == direction and r["seed"] == seed), None)
                    r = one_run(method, direction, seed, args, workdir, init)
                    runs.append(r)
                    print(f"{method:<14} {direction:<12} seed {seed}: accuracy {r['accuracy']:.4f}  "
                          f"train {r['train_seconds']:.1f}s  wall {r['wall_seconds']:.1f}s  "
                          f"{r['samples_per_s']:.0f} samples/s", flush=True)
    total = time.perf_counter() - start
    dann = [r["samples_per_s"] for r in runs if r["method"] == "dann"]
    summary = summarise(runs)
    result = {
        "command": " ".join(["python", "benchmarks/transfer_digits.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "model_selection": "none: fixed hyper-parameters (papers' defaults), last iterate scored; no target labels "
                           "used except the revealed 1% in finetune_1pct",
        "hardware": {"device": args.device,
                     "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                     "cpu": hardware(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "total_wall_seconds": total,
        "dann_throughput_samples_per_s": {"mean": statistics.fmean(dann) if dann else None,
                                          "per_run": dann, "rows_per_step": 2 * args.batch},
        "summary": summary, "reference_skada_bench": REFERENCE,
        "runs": [{k: v for k, v in r.items() if k != "checkpoint"} for r in runs],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(table(summary, args.directions))
    print(f"\n{len(runs)} runs in {total:.0f} s on {result['hardware']['gpu'] or result['hardware']['cpu']}; "
          f"DANN throughput {result['dann_throughput_samples_per_s']['mean'] or 0:.0f} samples/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
