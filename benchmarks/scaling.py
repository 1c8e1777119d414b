"""Scaling of second-order MAML's 15-query step with the number of processes the meta-batch is split over.

The step of ``maml_speed.py`` (Omniglot 5-way 1-shot, meta-batch 32, 15 queries per class, one
inner step, ``conv4_stride``, the trainer's step with the config defaults) with the meta-batch
split over 1, 2, ... processes (``train.processes``: PyTorch's elastic launcher, as torchrun runs
it), each setting in a fresh process, process 0's median seconds per step.

    python benchmarks/scaling.py                                   # CPU: 1 and 2 processes on the machine's cores
    python benchmarks/scaling.py --device cuda --processes 1 2 4 8 # one GPU per process

On CPUs the processes share the machine's cores (``--cores``, default all: ``cores / P`` threads
each), so the ideal is the one-process time and the efficiency is ``t1 / tP``. On GPUs each process
has a GPU of its own, so the ideal is ``t1 / P`` and the efficiency is ``t1 / (P tP)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(processes: int, threads: int, device: str, iters: int, warmup: int, backbone: str) -> dict:
    """``maml_speed.py``'s step of second-order MAML in a fresh process, split over ``processes``."""
    cmd = [
        sys.executable,
        str(HERE / "maml_speed.py"),
        "--child",
        "maml",
        backbone,
        *("--iters", str(iters), "--warmup", str(warmup), "--threads", str(threads)),
        *("--device", device, "--processes", str(processes)),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process (or GPU) counts")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    ap.add_argument("--cores", type=int, default=None, help="CPU cores shared by the processes (default: all)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backbone", default="conv4_stride")
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    args = ap.parse_args(argv)
    if args.processes[0] != 1:
        ap.error("--processes starts with 1: the efficiencies are relative to one process")

    sys.path.insert(0, str(HERE))
    from _step import machine, write_json

    cores = args.cores or len(os.sched_getaffinity(0))
    gpu = args.device.startswith("cuda")
    record = {
        "benchmark": "scaling",
        "setting": "second-order MAML, Omniglot 5-way 1-shot, meta-batch 32 split over the processes, "
        f"15 queries per class, 1 inner step, {args.backbone}, float32, train.executor auto",
        "device": args.device,
        "cores": cores,
        **machine(cores),
        "command": "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": [],
    }
    base = None
    for p in args.processes:
        threads = max(1, cores // p)
        res = measure(p, threads, args.device, args.iters, args.warmup, args.backbone)
        seconds = res["seconds_per_iter_median"]
        base = base or seconds
        speedup = base / seconds
        row = {
            "processes": p,
            "threads_per_process": threads,
            "seconds_per_step": seconds,
            "seconds_per_step_min": res["seconds_per_iter_min"],
            "speedup": speedup,
            "efficiency": speedup / p if gpu else speedup,
            "executor": res["executor"],
            "data": res["data"],
            "peak_rss_mb_per_process": res["peak_rss_mb"],
        }
        record["results"].append(row)
        print(
            f"{p} process(es) x {threads} thread(s): {seconds:.3f} s/step, speedup {speedup:.2f}, "
            f"efficiency {row['efficiency']:.2f}",
            flush=True,
        )
    record["load_average_at_end"] = list(os.getloadavg())
    record["date_end"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(args.out, record)


if __name__ == "__main__":
    main()
