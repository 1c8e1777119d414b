"""Training speed on a shared machine: the ProtoNet 10-minute config for ``--seconds``, alone and
beside busy single-threaded processes at the same priority (``--busy``: 0, 1 and 3 of them), with
each ``--threads`` setting (``auto`` and a fixed 2), after one unmeasured run that warms the machine.

Each run is the real trainer in a fresh process (``train.time_budget_min``); the score is the number
of training episodes done in the time. With ``num_threads: auto`` (the default) the runtime uses the
cores the other processes leave free (:mod:`metatl.engine.runtime`); the target is at most 2.5 times
slower beside one busy process than alone on 2 cores.

    python benchmarks/contention.py [--seconds 60] [--threads auto 2] [--busy 0 1 3] [--set KEY=VALUE ...]
        [--out benchmarks/results/contention.json]

The config trains in bfloat16, which is fast only on CPUs with bfloat16 units (Intel AMX); elsewhere
``--set train.precision=float32`` measures the runtime rather than bfloat16 emulation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "protonet_omniglot_5w1s_10min.yaml"


def _busy() -> None:
    while True:
        pass


def run_child(seconds: float, threads: str, overrides: list[str]) -> dict:
    """One training run in this process; returns episodes done and the thread count used."""
    from metatl.config import load_config
    from metatl.engine.trainer import Trainer

    value = "auto" if threads == "auto" else int(threads)
    cfg = load_config(
        CONFIG,
        [
            f"train.time_budget_min={seconds / 60}",
            "train.ckpt_every=0",
            f"train.num_threads={json.dumps(value)}",
            *overrides,
        ],
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, progress=False)
        start = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - start
    episodes = trainer.iteration * cfg.train.meta_batch
    return {
        "episodes": episodes,
        "episodes_per_s": episodes / trainer.train_seconds,
        "train_seconds": trainer.train_seconds,
        "wall_seconds": wall,
        "threads_at_end": trainer.runtime.threads,
    }


def measure(seconds: float, threads: str, busy: int, overrides: list[str]) -> dict:
    hogs = [mp.Process(target=_busy, daemon=True) for _ in range(busy)]
    for hog in hogs:
        hog.start()
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--seconds", str(seconds), "--threads", threads, "--set", *overrides],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        for hog in hogs:
            hog.terminate()
            hog.join()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", nargs="+", default=["auto", "2"], help="train.num_threads settings to compare")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3], help="busy processes beside the run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "contention.json"))
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (e.g. train.precision=float32)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.seconds, args.threads[0], args.set)))
        return

    from metatl.engine.runtime import available_cores
    from metatl.engine.trainer import hardware

    # the first run of a series is slower (a cold machine: page cache, CPU frequency); run it unmeasured
    measure(min(args.seconds, 15.0), args.threads[0], 0, args.set)
    runs = []
    for threads in args.threads:
        for busy in args.busy:
            res = {"threads": threads, "busy_processes": busy, **measure(args.seconds, threads, busy, args.set)}
            runs.append(res)
            print(
                f"num_threads={threads:>4} beside {busy} busy: {res['episodes']:6d} episodes "
                f"({res['episodes_per_s']:.2f}/s, {res['threads_at_end']} threads at the end)",
                flush=True,
            )
    for threads in args.threads:
        alone = next((r for r in runs if r["threads"] == threads and r["busy_processes"] == 0), None)
        for r in runs:
            if alone and r["threads"] == threads and r is not alone:
                r["slowdown"] = alone["episodes_per_s"] / r["episodes_per_s"]
    record = {
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": args.set,
        "seconds": args.seconds,
        "cores": available_cores(),
        "hardware": hardware(),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
