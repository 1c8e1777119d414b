"""Accuracy benchmarks: train, then score on fixed test episodes.

    python benchmarks/accuracy.py curve RUN [--plot curve.png]        # -> results/time_to_accuracy.json
    python benchmarks/accuracy.py mann-online RUN/last.pt [--episodes 1000] [--split test]   # -> results/mann_online.json
    python benchmarks/accuracy.py metric [--budget-min 60] [--only NAME ...] [--collect]
    python benchmarks/accuracy.py budget [--configs NAME ...] [--minutes 15 30] [--cores 2] [--parallel 5]
    python benchmarks/accuracy.py imaml-system CHECKPOINT_OR_CONFIG ... [--tasks 8] [--set KEY=VALUE ...]

``curve``: test accuracy (+- 95% CI, 600 fixed test episodes) of the snapshots a run kept at chosen
training minutes (``train.snapshot_minutes``), as an entry of one JSON (and a plot). A run that kept a moving average
of its weights (``train.ema_decay``) is scored twice, with the average and with the raw weights. The
MAML time-to-accuracy protocol:

    metatl train configs/maml_omniglot_5w1s.yaml --out runs/maml_tta --set train.ema_decay=0.999 \\
        train.time_budget_min=15 "train.snapshot_minutes=[2.5,5,7.5,10,12.5,15]" train.num_threads=2 \\
        train.executor=compile train.val_every=0
    python benchmarks/accuracy.py curve runs/maml_tta

``mann-online``: the MANN paper's online protocol (Santoro et al. 2016, table 1): accuracy at the
1st, 2nd, 5th and 10th instance of each class in sequences of 5 Omniglot classes x 10 instances,
labels shuffled per episode, for a checkpoint trained with configs/mann_omniglot_online.yaml.
``--split train`` scores sequences of training characters (to tell fitting from generalizing).

``metric``: the Omniglot table of docs/metric.md. Each run is ``metatl train
configs/<name>.yaml --out runs/metric/<name> --set train.time_budget_min=<budget> --no-progress``
(training stops at the budget or at the config's iteration count, whichever comes first; the trainer
then runs the test episodes). A finished run (results.json present) is skipped unless ``--force``.
The table goes to stdout and to ``--out``/metric_results.md, the numbers to metric_results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def curve(argv=None) -> int:
    """Score a run's snapshots: the time-to-accuracy curve."""
    ap = argparse.ArgumentParser(prog="accuracy.py curve", description=curve.__doc__)
    ap.add_argument("run", type=Path)
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "time_to_accuracy.json",
        help="JSON of runs by folder name; this run's entry is replaced, the others kept",
    )
    ap.add_argument("--plot", type=Path, default=None, help="also plot the curve to this .png")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--reference", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for scoring (eval.*)")
    args = ap.parse_args(argv)

    from metatl.config import load_yaml
    from metatl.engine import checkpoint as ckpt_io
    from metatl.engine.run import evaluate_checkpoint
    from metatl.engine.trainer import hardware

    points = []
    snaps = sorted(args.run.glob("snapshot_*min.pt"), key=lambda p: float(re.findall(r"[\d.]+", p.name)[0]))
    for snap in snaps:
        averaged = ckpt_io.load(snap).get("averaged") is not None
        for weights in ("averaged", "raw") if averaged else ("raw",):
            res, _ = evaluate_checkpoint(
                snap,
                [f"eval.episodes={args.episodes}", f"eval.weights={weights}", *args.set],
                out=tempfile.mkdtemp(),
                progress=False,
            )  # the numbers go to --out
            points.append(
                {
                    "minutes": res["train_seconds"] / 60,
                    "iteration": res["iterations"],
                    "weights": weights,
                    "accuracy": res["metric"]["mean"],
                    "ci95": res["metric"]["ci95"],
                }
            )
            print(
                f"{points[-1]['minutes']:6.2f} min  it {res['iterations']:6d}  {weights:8s} "
                f"{100 * res['metric']['mean']:.2f} +- {100 * res['metric']['ci95']:.2f}%",
                flush=True,
            )
    run_results = args.run / "results.json"  # the run's own record: versions, training length
    run = json.loads(run_results.read_text()) if run_results.exists() else {}
    config = args.run / "config.yaml"
    record = {
        "run": str(args.run),
        "episodes": args.episodes,
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": run.get("torch_version"),
        "metatl": run.get("metatl_version"),
        "train_seconds": run.get("train_seconds"),
        "iterations": run.get("iterations"),
        "overrides": args.set,
        "config": load_yaml(config.read_text()) if config.exists() else None,
        "points": points,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs[args.run.name] = record
    args.out.write_text(json.dumps(runs, indent=1))
    print(f"wrote {args.out} ({args.run.name})")
    if args.plot is None:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    kinds = sorted({p["weights"] for p in points})
    for weights in kinds:
        these = [p for p in points if p["weights"] == weights]
        label = "metatl MAML" + (f", {weights} weights" if len(kinds) > 1 else "") + " (test, 600 episodes)"
        ax.errorbar(
            [p["minutes"] for p in these],
            [100 * p["accuracy"] for p in these],
            yerr=[100 * p["ci95"] for p in these],
            marker="o",
            capsize=3,
            label=label,
        )
    for r in args.reference:
        ax.axhline(100 * r, ls=":", color="gray")
    ax.set(xlabel="training minutes", ylabel="5-way 1-shot accuracy (%)", title=args.run.name)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")
    return 0


def mann_online(argv=None) -> int:
    """The MANN paper's online protocol for a checkpoint."""
    p = argparse.ArgumentParser(prog="accuracy.py mann-online", description=mann_online.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--name", default=None, help="the entry's name in --out (default: the run folder's name)")
    p.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "mann_online.json"),
        help="JSON of scored runs by name; this entry is replaced, the others kept",
    )
    args = p.parse_args(argv)
    from metatl.build import load_learner
    from metatl.data import build_sampler
    from metatl.engine.trainer import hardware
    from metatl.meta.mann import mann_online_accuracy

    learner = load_learner(args.checkpoint, overrides=["data.ways=5", "data.shots=5", "data.queries=5"])
    cfg = learner.config
    acc = mann_online_accuracy(learner, build_sampler(cfg.data, args.split), args.episodes, args.seed)
    result = {
        "checkpoint": args.checkpoint,
        "memory": cfg.algorithm.get("memory", True),
        "config": cfg.name,
        "algorithm": cfg.algorithm,
        "backbone": cfg.model.get("name"),
        "split": args.split,
        "episodes": args.episodes,
        "eval_seed": args.seed,
        "iterations": learner.trained["iterations"],
        "train_seconds": learner.trained["train_seconds"],
        "accuracy_by_instance": {str(k): v for k, v in acc.items()},
        "published_mann": {"2": 0.828, "5": 0.949},  # Santoro et al. 2016, table 1
        "hardware_of_this_scoring": hardware(),
        "torch_version": torch.__version__,
    }
    print(" ".join(f"instance {k}: {100 * v['mean']:.1f} +- {100 * v['ci95']:.1f}%" for k, v in acc.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else {}
    name = args.name or Path(args.checkpoint).resolve().parent.name
    runs[name] = result
    out.write_text(json.dumps(runs, indent=1))
    print(f"wrote {out} ({name})")
    return 0


METHODS = {"protonet": "Prototypical Networks", "matching": "Matching Networks", "relation": "Relation Network"}
SETTINGS = ("5w1s", "5w5s", "20w1s", "20w5s")
PUBLISHED = {  # accuracy %, Omniglot, as reported in each paper
    "protonet": (98.8, 99.7, 96.0, 98.9),  # Snell et al. 2017, Table 1
    "matching": (98.1, 98.9, 93.8, 98.5),  # Vinyals et al. 2016, Table 1 (no fine-tuning)
    "relation": (99.6, 99.8, 97.6, 99.1),  # Sung et al. 2018, Table 1
}


def run_names():
    return [f"{m}_omniglot_{s}" for m in METHODS for s in SETTINGS]


def train(name: str, budget: float, runs: Path, overrides) -> int:
    """``metatl train`` one config under a budget; ``overrides`` join the budget in one ``--set``."""
    cmd = [
        sys.executable,
        "-m",
        "metatl.cli",
        "train",
        str(ROOT / "configs" / f"{name}.yaml"),
        "--out",
        str(runs / name),
        "--no-progress",
        "--overwrite",
        "--set",
        f"train.time_budget_min={budget}",
        *overrides,
    ]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def collect(runs: Path) -> dict:
    table = {}
    for name in run_names():
        path = runs / name / "results.json"
        if path.exists():
            r = json.loads(path.read_text())
            table[name] = {
                "mean": 100 * r["metric"]["mean"],
                "ci95": 100 * r["metric"]["ci95"],
                "episodes": r["episodes"],
                "iterations": r["iterations"],
                "train_minutes": r["train_seconds"] / 60,
                "hardware": r["hardware"],
            }
    return table


def markdown(table: dict) -> str:
    head = "| method | " + " | ".join("{}-way {}-shot".format(*s[:-1].split("w")) for s in SETTINGS) + " |"
    lines = [head, "|---|" + "---|" * len(SETTINGS)]
    for m, title in METHODS.items():
        lines.append(f"| {title} (published) | " + " | ".join(f"{v:.1f}" for v in PUBLISHED[m]) + " |")
        cells = []
        for s in SETTINGS:
            r = table.get(f"{m}_omniglot_{s}")
            cells.append(
                f"{r['mean']:.1f} +- {r['ci95']:.1f} ({r['train_minutes']:.0f} min, {r['iterations']} it)"
                if r
                else "not yet run"
            )
        lines.append(f"| {title} (metatl) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric(argv=None) -> int:
    """Train and test every metric-learning config under a budget; collect the table."""
    p = argparse.ArgumentParser(prog="accuracy.py metric", description=metric.__doc__)
    p.add_argument("--budget-min", type=float, default=60.0, help="training minutes per run")
    p.add_argument("--only", nargs="+", help="run only these config names")
    p.add_argument("--runs", default=str(ROOT / "runs" / "metric"), help="folder of the run folders")
    p.add_argument("--collect", action="store_true", help="do not train; only collect results")
    p.add_argument("--force", action="store_true", help="train again even when results.json exists")
    p.add_argument("--set", nargs="+", default=[], help="extra overrides for every run, e.g. train.device=cuda")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for metric_results.json / .md")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    failed = []
    if not args.collect:
        for name in args.only or run_names():
            if (runs / name / "results.json").exists() and not args.force:
                print(f"{name}: done, skipping (--force to redo)")
                continue
            if train(name, args.budget_min, runs, args.set) != 0:
                failed.append(name)
    table = collect(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric_results.json").write_text(json.dumps({"published": PUBLISHED, "ours": table}, indent=2))
    text = markdown(table)
    (out / "metric_results.md").write_text(text + "\n")
    print(text)
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


BUDGET_CONFIGS = [f"{m}_omniglot_5w1s" for m in ("maml", "meta_sgd", "maml_pp", "anil", "imaml")]
BUDGET_PUBLISHED = {  # Omniglot 5-way 1-shot accuracy %, as reported in each paper
    "maml": (98.7, "Finn et al. 2017, Table 1"),
    "meta_sgd": (99.53, "Li et al. 2017, Table 1"),
    "maml_pp": (99.47, "Antoniou et al. 2019, Table 1"),
    "anil": (None, "Raghu et al. 2020 report 20-way only"),
    "imaml": (99.16, "Rajeswaran et al. 2019, Table 2 (iMAML with the GD inner solver, as configured)"),
}


def how_to_train(name: str, folder: Path, overrides: list[str], fresh: bool) -> str | None:
    """``--overwrite`` (train from the start), ``--resume`` (a run with these settings stopped
    before its end: continue it from its checkpoint) or None (it finished with these settings)."""
    from metatl.config import load_config
    from metatl.engine.trainer import RESUME_FREE_KEYS, config_changes

    if fresh or not (folder / "config.yaml").exists():
        return "--overwrite"
    ran = load_config(folder / "config.yaml").to_dict()
    wanted = load_config(ROOT / "configs" / f"{name}.yaml", overrides).to_dict()
    if any(k not in RESUME_FREE_KEYS for k in config_changes(ran, wanted)):
        return "--overwrite"  # another budget or other settings: this table needs a new run
    if (folder / "results.json").exists():
        return None
    return "--resume" if (folder / "last.pt").exists() else "--overwrite"


def stop_runs(procs: list) -> None:
    """Stop training processes and wait for them: each gets SIGTERM, on which ``metatl train``
    finishes its iteration and writes its ``last.pt``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait()


def budget(argv=None) -> int:
    """Optimization-based meta-learners side by side under one compute budget: each config trains
    with the CPU-time clock (``train.budget_clock=cpu``, one thread per run), so "M minutes on C
    cores" is ``C x M`` CPU minutes whatever else the machine runs, and runs may share the machine
    (``--parallel``) without favouring one another. Snapshots at each budget are scored on the fixed
    test episodes (once: the score is kept beside the snapshot, so ``--collect`` may run while the
    runs train); the table goes to results/optimization_budget.json. Running the command again keeps
    the runs that finished with the same settings and continues the ones stopped on the way (Ctrl-C
    or SIGTERM writes a checkpoint in every run), so the hours a long budget takes can be spent in
    parts."""
    p = argparse.ArgumentParser(prog="accuracy.py budget", description=budget.__doc__)
    p.add_argument("--configs", nargs="+", default=BUDGET_CONFIGS, help="config names under configs/")
    p.add_argument("--minutes", type=float, nargs="+", default=[15.0, 30.0], help="budgets, minutes on --cores cores")
    p.add_argument("--cores", type=int, default=2, help="a budget of M minutes is cores x M CPU minutes")
    p.add_argument("--parallel", type=int, default=1, help="runs training at once")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "budget")
    p.add_argument("--collect", action="store_true", help="do not train; only score and collect")
    p.add_argument("--fresh", action="store_true", help="train every run from the start, even one finished or stopped")
    p.add_argument("--set", nargs="+", default=[], help="overrides for every run, e.g. train.executor=loop")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "optimization_budget.json")
    args = p.parse_args(argv)
    from metatl.engine.run import eval_name, evaluate_checkpoint
    from metatl.engine.trainer import StopSignals, hardware

    cpu_minutes = [m * args.cores for m in sorted(args.minutes)]
    common = [
        f"train.time_budget_min={cpu_minutes[-1]}",
        "train.budget_clock=cpu",
        "train.num_threads=1",
        f"train.snapshot_minutes=[{','.join(f'{m:g}' for m in cpu_minutes)}]",
        "train.val_every=0",
        f"eval.episodes={args.episodes}",
        *args.set,
    ]
    if not args.collect:
        todo = {name: how_to_train(name, args.runs / name, common, args.fresh) for name in args.configs}
        for name in (n for n, how in todo.items() if how is None):
            print(f"{name}: finished in {args.runs / name} with these settings; kept (--fresh trains it again)")
        pending, running, failed = [n for n, how in todo.items() if how], {}, []
        # Ctrl-C or SIGTERM here stops the runs (each in its own session, so that the terminal's
        # Ctrl-C reaches this process only): SIGTERM to each, which writes its checkpoint first
        with StopSignals() as signals:
            try:
                while pending or running:
                    while pending and len(running) < args.parallel:
                        name = pending.pop(0)
                        cmd = [sys.executable, "-m", "metatl.cli", "train", str(ROOT / "configs" / f"{name}.yaml")]
                        cmd += ["--out", str(args.runs / name), "--no-progress", todo[name], "--set", *common]
                        print("$", " ".join(cmd), flush=True)
                        running[name] = subprocess.Popen(cmd, start_new_session=True)
                    for _ in range(50):
                        time.sleep(0.1)
                        signals.check()
                    for name, proc in list(running.items()):
                        if proc.poll() is not None:
                            del running[name]
                            if proc.returncode:
                                failed.append(name)
            except KeyboardInterrupt:
                signals.shield()
                stop_runs(list(running.values()))
                print("stopped: the same command continues the runs from their checkpoints", file=sys.stderr)
                raise SystemExit(128 + getattr(signal, signals.by or "SIGINT")) from None
        if failed:
            print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    runs = {}
    for name in args.configs:
        folder = args.runs / name
        final = json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else None
        points = []
        for m, cpu in zip(sorted(args.minutes), cpu_minutes):
            snap = folder / f"snapshot_{cpu:g}min.pt"
            if final is not None and abs(final["train_seconds"] / 60 - cpu) < 0.05 * cpu:
                res = final  # the run ended at this budget, and the trainer has scored those weights
            elif snap.exists():  # scored once, beside the snapshot; collecting again reads that
                scored = folder / eval_name(snap, args.episodes)
                if scored.exists():
                    res = json.loads(scored.read_text())
                else:
                    res, _ = evaluate_checkpoint(snap, [f"eval.episodes={args.episodes}"], progress=False)
            else:
                continue
            points.append(
                {
                    "minutes": m,
                    "cpu_minutes": res["train_seconds"] / 60,
                    "iterations": res["iterations"],
                    "accuracy": 100 * res["metric"]["mean"],
                    "ci95": 100 * res["metric"]["ci95"],
                }
            )
            print(
                f"{name:28s} {m:5g} min  it {res['iterations']:6d}  {points[-1]['accuracy']:.2f} +- {points[-1]['ci95']:.2f}%"
            )
        if not points:
            continue
        method = name.split("_omniglot")[0]
        runs[name] = {"method": method, "published": BUDGET_PUBLISHED.get(method), "points": points}
    record = {
        "command": "python benchmarks/accuracy.py budget " + " ".join(argv if argv is not None else sys.argv[2:]),
        "cores": args.cores,
        "episodes": args.episodes,
        "overrides": common,
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


def imaml_system(argv=None) -> int:
    """The extreme eigenvalues of the matrix iMAML's meta-gradient inverts,
    ``(1 + cg_damping) I + H / (lam + lam_damping)`` (:meth:`~metatl.meta.IMAML.system_eigenvalues`),
    on training tasks, for checkpoints of a run (or a config's initial weights): conjugate gradient
    needs it positive definite. ``--set`` overrides the learner's config (e.g. the damping), so one
    set of weights can be read under either system. Writes results/imaml_system.json (one entry per
    source and overrides)."""
    p = argparse.ArgumentParser(prog="accuracy.py imaml-system", description=imaml_system.__doc__)
    p.add_argument("sources", nargs="+", help="checkpoints, or configs (their initial weights, seed 0)")
    p.add_argument("--tasks", type=int, default=8, help="training tasks (seed 0)")
    p.add_argument("--set", nargs="+", default=[], help="config overrides, e.g. algorithm.cg_damping=1")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "imaml_system.json")
    args = p.parse_args(argv)
    import metatl
    from metatl.build import build_learner, build_sampler
    from metatl.config import load_config
    from metatl.engine.trainer import hardware

    torch.set_num_threads(1)
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    for source in args.sources:
        if source.endswith((".yaml", ".yml")):
            torch.manual_seed(0)
            cfg = load_config(source, list(args.set))
            sampler = build_sampler(cfg.data, "train")
            learner = build_learner(cfg, sampler)
        else:
            learner = metatl.load(source, overrides=list(args.set))
            sampler = build_sampler(learner.config.data, "train")
        learner.double().train()
        theta = learner.params()
        values = []
        for ep in sampler.sample_batch(args.tasks, torch.Generator().manual_seed(0)):
            values.append(learner.system_eigenvalues(theta, ep.support_x.double(), ep.support_y))
            print(f"{source}: smallest {values[-1][0]:.3f}, largest {values[-1][1]:.3f}", flush=True)
        key = " ".join([source, *args.set])
        record[key] = {
            "source": source,
            "overrides": args.set,
            "lam": learner.lam,
            "cg_damping": learner.cg_damping,
            "lam_damping": learner.lam_damping,
            "smallest": [v[0] for v in values],
            "largest": [v[1] for v in values],
            "command": "python benchmarks/accuracy.py imaml-system "
            + " ".join(argv if argv is not None else sys.argv[2:]),
            "hardware": hardware(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


COMMANDS = {
    "curve": curve,
    "mann-online": mann_online,
    "metric": metric,
    "budget": budget,
    "imaml-system": imaml_system,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
