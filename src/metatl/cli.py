"""Command line: parses and dispatches, nothing else (the work is in :mod:`metatl.engine.run`).

metatl train CONFIG [--set key=value ...] [--out DIR] [--resume [--allow-change KEY ...]] [--overwrite]
metatl eval CHECKPOINT [--set key=value ...] [--out DIR]
metatl adapt CHECKPOINT --support DIR --query DIR [--out DIR]
metatl upgrade-checkpoint CHECKPOINT [--out NEW.pt]
metatl sweep CONFIG --space SPACE.yaml --trials N [--storage URL] [--study NAME] [--out DIR] [--pruner median|none]
metatl list
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def _data_overrides(args) -> list:
    extra = []
    if getattr(args, "data_dir", None):
        extra.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "download", False):
        extra.append("data.download=true")
    return extra


def cmd_train(args) -> int:
    from .config import ConfigError, load_config
    from .engine.distributed import launched
    from .engine.run import train

    cfg = load_config(args.config, (args.set or []) + _data_overrides(args))
    if not args.out and launched():
        raise ConfigError(
            "under torchrun, name the run folder with --out DIR: every process (and an elastic restart) must use the same one."
        )
    out = Path(args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    train(
        cfg,
        out,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_changes=tuple(args.allow_change or ()),
    )
    return 0


def cmd_eval(args) -> int:
    from .engine.run import evaluate_checkpoint, results_table

    results, path = evaluate_checkpoint(
        args.checkpoint, (args.set or []) + _data_overrides(args), args.out, progress=not args.no_progress
    )
    print(results_table(results))
    print(f"results: {path}")  # beside the run's results.json, never over it
    return 0


def cmd_adapt(args) -> int:
    import metatl

    from .engine.predict import classify_folder, write_predictions
    from .engine.run import predictions_path, table

    out = predictions_path(args.out)  # checked before any work: nothing but a predictions table is replaced
    learner = metatl.load(args.checkpoint)
    result = classify_folder(
        learner, args.support, args.query, steps=args.steps, invert=args.invert, transductive=args.transductive
    )
    fmt = result["input"]
    print(
        f"{len(result['classes'])} classes from {args.support}: {', '.join(result['classes'])}; images as "
        f"{fmt['in_channels']}-channel {fmt['image_size']}x{fmt['image_size']}{' inverted' if fmt['invert'] else ''}"
    )
    labelled = result["labelled"] > 0
    rows = [
        [r["file"], r["predicted"], f"{r['confidence']:.3f}"] + ([r["true"] or "-"] if labelled else [])
        for r in result["rows"]
    ]
    print(table(rows, ["file", "predicted", "confidence"] + (["true"] if labelled else [])))
    if result["accuracy"] is not None:
        print(f"accuracy on the {result['labelled']} labelled query images: {100 * result['accuracy']:.1f}%")
    print(f"predictions: {write_predictions(result, out)}")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    study, out = run_sweep(
        args.config,
        args.space,
        args.trials,
        storage=args.storage,
        study=args.study,
        out=args.out,
        overrides=(args.set or []) + _data_overrides(args),
        pruner=args.pruner,
        progress=not args.no_progress,
    )
    print(f"study {study.study_name}: {len(study.trials)} trials; summary: {out / 'summary.md'}")
    return 0


def cmd_upgrade(args) -> int:
    from .checkpoint import upgrade

    print(f"upgraded: {upgrade(args.checkpoint, args.out)}")
    return 0


def cmd_compare(args) -> int:
    import shlex

    from .compare import compare, load_spec

    spec = load_spec(args.spec)
    out = Path(args.out or Path("runs") / f"compare-{spec.name}")
    command = "metatl compare " + " ".join(shlex.quote(a) for a in [args.spec, "--out", str(out)])
    compare(spec, out, progress=not args.no_progress, command=command)
    print((out / "compare.md").read_text(), end="")
    print(f"card: {out / 'card.md'}")
    return 0


def cmd_list(args) -> int:
    import metatl  # noqa: F401  (registers everything)

    from . import registry

    for title, reg in (
        ("algorithms", registry.ALGORITHMS),
        ("datasets", registry.DATASETS),
        ("backbones", registry.BACKBONES),
        ("estimators", registry.ESTIMATORS),
    ):
        print(f"{title}:")
        for name, obj in reg.items():
            doc = (obj.__doc__ or "").strip().splitlines()
            print(f"  {name:<16} {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metatl", description="Meta-learning and transfer learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override config values, e.g. train.lr=0.01")
        p.add_argument(
            "--out",
            help="output folder (train: the run folder; eval: where eval_*.json goes, default the checkpoint's folder)",
        )
        p.add_argument("--data-dir", help="data folder (default: $METATL_DATA_DIR, then ~/.cache/metatl)")
        p.add_argument("--download", action="store_true", help="download missing data files")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="meta-train a config, then evaluate it on the test episodes")
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument(
        "--allow-change",
        nargs="+",
        metavar="KEY",
        help="with --resume: config keys that may differ from the run's (e.g. train.iterations)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out folder that already holds a run (replaces it)",
    )
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the fixed test episodes")
    p.add_argument("checkpoint")
    common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("adapt", help="few-shot classify your own images with a checkpoint")
    p.add_argument("checkpoint", help="a .pt checkpoint of any meta-learner")
    p.add_argument("--support", required=True, help="folder with one sub-folder of a few images per new class")
    p.add_argument("--query", required=True, help="folder of images to classify")
    p.add_argument("--out", default=".", help="folder to write predictions.csv in (default: the current folder)")
    p.add_argument("--steps", type=int, help="test-time inner steps (MAML / Reptile; default: the checkpoint's)")
    p.add_argument(
        "--invert",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="invert pixel values (default: only for Omniglot checkpoints, which expect ink = 1)",
    )
    p.add_argument(
        "--transductive",
        action="store_true",
        help="classify all query images in one batch (BatchNorm statistics shared across them)",
    )
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("sweep", help="search hyper-parameters of a config with Optuna (pip install 'metatl[sweep]')")
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("--space", required=True, help="YAML file of config keys and their ranges (see configs/spaces/)")
    p.add_argument("--trials", type=int, required=True, help="trials in the study in all, over every worker")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/optuna.db)")
    p.add_argument("--study", help="study name, shared by workers (default: the config's name + _sweep)")
    p.add_argument(
        "--pruner", default="median", choices=("median", "none"), help="median (Optuna's MedianPruner) or none"
    )
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override config values in every trial")
    p.add_argument("--out", help="sweep folder: trial_NNNN run folders, summary, plots (default runs/STUDY)")
    p.add_argument("--data-dir", help="data folder (default: $METATL_DATA_DIR, then ~/.cache/metatl)")
    p.add_argument("--download", action="store_true", help="download missing data files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("upgrade-checkpoint", help="rewrite a checkpoint of an older metatl in the safe format")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="write the upgraded checkpoint here (default: in place)")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("compare", help="score several methods on the same fixed test episodes: table, plot, card")
    p.add_argument("spec", help="a compare spec (YAML; see configs/compare/)")
    p.add_argument("--out", help="output folder (default: runs/compare-<name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("list", help="list algorithms, datasets, backbones and estimators")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .engine.distributed import WorkerError
    from .engine.divergence import DivergenceError

    if getattr(args, "resume", False) and not args.out:
        print("metatl: error: --resume needs --out DIR, the run folder to continue.", file=sys.stderr)
        return 2
    from .data.files import DownloadError

    try:
        return args.func(args)
    except OSError as err:  # str() keeps the file name that args[0] (the errno) would drop
        print(f"metatl: error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, DivergenceError, DownloadError, WorkerError, ValueError, KeyError) as err:
        print(f"metatl: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM while training (the trainer's StopSignals)
        by = stop.args[0] if stop.args and hasattr(signal, str(stop.args[0])) else "SIGINT"
        print(f"metatl: stopped ({by}).", file=sys.stderr)
        return 128 + getattr(signal, by)


if __name__ == "__main__":
    sys.exit(main())
