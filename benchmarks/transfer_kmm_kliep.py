"""Time and peak memory of KMM and KLIEP weight estimation at 5,000 and 50,000 source samples.

Writes benchmarks/results/kmm_kliep.json. Peak memory is measured with tracemalloc (NumPy reports its
allocations to it), so it is the peak of Python + NumPy heap during the call, not the process RSS.

    OMP_NUM_THREADS=1 python benchmarks/transfer_kmm_kliep.py [--sizes 5000 50000]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from metatl.data.domains import make_shifted_blobs
from metatl.transfer import kliep_weights, kmm_weights
from metatl.transfer._base import resolve_gamma


def measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--n-target", type=int, default=1000)
    ap.add_argument("--n-features", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=["kmm", "kliep"])
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        X, _, sd = make_shifted_blobs(n, args.n_target, n_features=args.n_features, random_state=0)
        Xs, Xt = X[sd > 0], X[sd < 0]
        gamma = resolve_gamma("scale", X)
        runs = {
            "kmm": lambda: kmm_weights(Xs, Xt, gamma=gamma, random_state=0, return_info=True),
            "kliep": lambda: kliep_weights(Xs, Xt, gamma=[gamma * g for g in (0.1, 0.3, 1, 3, 10)], random_state=0,
                                           return_info=True),
        }
        for name, fn in runs.items():
            if name not in args.methods:
                continue
            (w, info), seconds, peak = measure(fn)
            row = {"method": name, "n_source": n, "n_target": len(Xt), "n_features": Xs.shape[1],
                   "seconds": round(seconds, 2), "peak_mib": round(peak, 1), "mean_weight": float(w.mean())}
            if name == "kmm":
                row.update(solver=info["solver"], n_iter=info["n_iter"])
            else:
                row.update(gamma=info["gamma"], cv="5-fold likelihood CV over 5 widths", n_centers=100)
            rows.append(row)
            print(row, flush=True)
    path = Path(__file__).parent / "results" / "kmm_kliep.json"
    path.parent.mkdir(exist_ok=True)
    if path.exists():  # keep rows of other sizes from earlier runs
        new = {(r["method"], r["n_source"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["results"] if (r["method"], r["n_source"]) not in new] + rows
    rows.sort(key=lambda r: (r["n_source"], r["method"]))
    out = {"machine": platform.processor() or platform.machine(), "results": rows}
    path.write_text(json.dumps(out, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
