"""One entry point for the benchmark suite (run from the repository root):

    python -m benchmarks speed [--quick]              # MAML step vs learn2learn, episodes/s of the other learners
    python -m benchmarks accuracy curve|mann-online|metric|budget ...   # score runs on fixed test episodes
    python -m benchmarks transfer [--quick]           # classical estimators, deep domain adaptation on digits
    python -m benchmarks learned-optimizer [--quick]  # the LSTM optimizer against SGD, RMSprop, Adam
    python -m benchmarks transferability [--quick]    # meta-learned starts fine-tuned on digits; LEEP, LogME, ...
    python -m benchmarks contention [...]             # training speed beside other processes
    python -m benchmarks scaling [--quick]            # MAML's step with the meta-batch split over 1, 2, ... processes
    python -m benchmarks memory [--quick]             # peak memory against inner steps (MAML, checkpointing, iMAML)
    python -m benchmarks report [--check]             # docs/results.md from benchmarks/results/*.json

Each benchmark is a script in this folder that can also be run on its own with more options
(``python benchmarks/NAME.py --help``); ``speed``'s MAML step, ``scaling`` and ``memory`` are the
three modes of ``maml_speed.py`` (``step``, ``scaling``, ``memory``). A full run writes its one JSON
per measurement under benchmarks/results/.
``--quick`` runs a small smoke version of each script and writes to a temporary folder, so the
checked-in results are never overwritten by it. benchmarks/README.md says what each one measures.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _learn2learn() -> list[str] | None:
    """learn2learn_compare.py's options for where learn2learn is, or None when it is nowhere."""
    if os.environ.get("LEARN2LEARN_SRC"):
        return ["--learn2learn-src", os.environ["LEARN2LEARN_SRC"]]
    if importlib.util.find_spec("learn2learn") is not None:
        return []
    print(
        "learn2learn not found (pip install learn2learn==0.2.0, or LEARN2LEARN_SRC=its package folder): "
        "learn2learn_compare.py skipped",
        file=sys.stderr,
    )
    return None


def _speed(quick: bool, tmp: str) -> list[list[str]]:
    l2l = _learn2learn()
    if not quick:
        return [
            ["maml_speed.py", "step"],
            *([["learn2learn_compare.py", *l2l]] if l2l is not None else []),
            ["episode_speed.py"],
        ]
    runs = [
        [
            "maml_speed.py",
            "step",
            "--algorithms",
            "maml",
            "--backbones",
            "conv4_stride",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--out",
            f"{tmp}/maml_speed.json",
        ],
        ["episode_speed.py", "--seconds", "0.5", "--methods", "protonet", "mann", "--out", f"{tmp}/episode_speed.json"],
    ]
    if l2l is not None:
        runs.append(
            [
                "learn2learn_compare.py",
                *l2l,
                "--rounds",
                "1",
                "--backbones",
                "conv4_stride",
                "--out",
                f"{tmp}/learn2learn_compare.json",
            ]
        )
    return runs


def _accuracy(quick: bool, tmp: str) -> list[list[str]]:
    if not quick:
        return [["accuracy.py"]]
    return [
        [
            "accuracy.py",
            "metric",
            "--only",
            "protonet_omniglot_5w1s",
            "--budget-min",
            "0.05",
            "--runs",
            tmp,
            "--out",
            tmp,
            "--set",
            "eval.episodes=20",
            "train.val_every=0",
        ]
    ]


def _transfer(quick: bool, tmp: str) -> list[list[str]]:
    if not quick:
        return [["transfer_classical.py"], ["transfer_classical.py", "--cost"], ["transfer_digits.py"]]
    return [
        ["transfer_classical.py", "--cost", "--sizes", "500", "--out", f"{tmp}/transfer_classical.json"],
        ["transfer_digits.py", "--device", "cpu", "--quick", "--out", f"{tmp}/transfer_digits.json"],
    ]


def _learned_optimizer(quick: bool, tmp: str) -> list[list[str]]:
    return [
        ["learned_optimizer.py", "--quick", "--only", "quadratic", "--out", tmp] if quick else ["learned_optimizer.py"]
    ]


def _transferability(quick: bool, tmp: str) -> list[list[str]]:
    if not quick:
        return [["transferability.py"]]
    return [["transferability.py", "--quick", "--runs", f"{tmp}/runs", "--out", f"{tmp}/transferability.json"]]


def _contention(quick: bool, tmp: str) -> list[list[str]]:
    return [
        ["contention.py", "--seconds", "5", "--busy", "0", "--out", f"{tmp}/contention.json"]
        if quick
        else ["contention.py"]
    ]


def _scaling(quick: bool, tmp: str) -> list[list[str]]:
    return [
        ["maml_speed.py", "scaling", "--iters", "1", "--warmup", "1", "--out", f"{tmp}/scaling.json"]
        if quick
        else ["maml_speed.py", "scaling"]
    ]


def _memory(quick: bool, tmp: str) -> list[list[str]]:
    return [
        ["maml_speed.py", "memory", "--quick", "--out", f"{tmp}/memory.json"] if quick else ["maml_speed.py", "memory"]
    ]


def _report(quick: bool, tmp: str) -> list[list[str]]:
    return [["report.py", "--check"] if quick else ["report.py"]]


BENCHMARKS = {
    "speed": _speed,
    "accuracy": _accuracy,
    "transfer": _transfer,
    "learned-optimizer": _learned_optimizer,
    "transferability": _transferability,
    "contention": _contention,
    "scaling": _scaling,
    "memory": _memory,
    "report": _report,
}


def _script(run: list[str]) -> str:
    """A run's script and its mode (``maml_speed.py step``), without the run's options."""
    mode = run[1:2] if len(run) > 1 and not run[1].startswith("-") else []
    return " ".join(["python benchmarks/" + run[0], *mode])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    quick = "--quick" in rest
    rest = [a for a in rest if a != "--quick"]
    with tempfile.TemporaryDirectory(prefix="metatl-bench-") as tmp:
        runs = BENCHMARKS[name](quick, tmp)
        if rest:  # extra options go to the benchmark's one script
            if len(runs) != 1:
                print(
                    f"`{name}` runs {len(runs)} scripts; pass options to one of them: "
                    + ", ".join(_script(r) for r in runs),
                    file=sys.stderr,
                )
                return 2
            runs[0] = runs[0] + rest
        for script, *args in runs:
            if not (HERE / script).exists():
                print(f"benchmarks/{script} is not in this checkout", file=sys.stderr)
                return 2
            command = [sys.executable, str(HERE / script), *args]
            print("$", " ".join(command), flush=True)
            code = subprocess.call(command)
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
