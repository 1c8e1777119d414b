"""Accuracy tables for docs/transfer.md; writes benchmarks/results/transfer_classical.json.

1. Simulated covariate shift (``make_shifted_blobs(shift='covariate')``): 100 labelled source +
   100 unlabelled target samples for adaptation, accuracy on 1,000 fresh target samples, SVC
   (RBF, default C and gamma) as base, 5 seeds. Methods: source only, KMM, KLIEP, CORAL (+ source
   SVC; centred, the default, and ``center=False``), and the target-trained oracle (SVC on the 100 target samples *with* their labels).
   Every method uses its default hyper-parameters: no model selection, no target label used.
2. TrAdaBoost on a real tabular problem: scikit-learn's breast-cancer data (569 x 30), split into
   domains by the feature "mean texture": source = rows below its median, target = rows above.
   Per seed, ``n_labelled`` stratified target rows are labelled for training; the rest of the target
   is the test set. Base learner: DecisionTreeClassifier(max_depth=3); features standardised with
   source statistics. Baselines: source only, target only, source + target pooled.
   Also TrAdaBoost on three classes (``make_blobs(300, random_state=0)``, every other row a labelled
   target row) against one depth-2 tree, with SAMME's vote and with the paper's second-half vote.
3. ``--cost``: time and peak memory of KMM and KLIEP weight estimation at 5,000 and 50,000 source
   samples (5 features, 1,000 target rows). Peak memory is measured with tracemalloc (NumPy reports
   its allocations to it): the peak of the Python + NumPy heap during the call, not the process RSS.

    OMP_NUM_THREADS=1 python benchmarks/transfer_classical.py [--out benchmarks/results/transfer_classical.json]
    OMP_NUM_THREADS=1 python benchmarks/transfer_classical.py --cost [--sizes 5000 50000]

Each run replaces its own sections of ``--out`` and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, make_blobs
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from metatl.data.domains import make_shifted_blobs
from metatl.transfer import (
    CORAL,
    KLIEP,
    KMM,
    SourceOnly,
    TrAdaBoost,
    kliep_weights,
    kmm_weights,
)
from metatl.transfer._base import resolve_gamma

SEEDS = range(5)


def covariate_shift_table():
    methods = {
        "source only": lambda: SourceOnly(SVC()),
        "KMM": lambda: KMM(SVC()),
        "KLIEP": lambda: KLIEP(SVC(), random_state=0),
        "CORAL": lambda: make_pipeline(CORAL(), SourceOnly(SVC())),
        "CORAL (center=False)": lambda: make_pipeline(CORAL(center=False), SourceOnly(SVC())),
    }
    acc = {name: [] for name in [*methods, "target trained"]}
    kliep_fits = []
    for seed in SEEDS:
        X, y, sd, yt = make_shifted_blobs(100, 1100, shift="covariate", random_state=seed, return_target_labels=True)
        keep = np.r_[np.arange(200)]  # 100 source + the first 100 target rows are used for adaptation
        X_test, y_test = X[200:], yt[100:]
        for name, make in methods.items():
            est = make()
            if name.startswith("CORAL"):
                est.fit(X[keep], y[keep])
            else:
                est.fit(X[keep], y[keep], sample_domain=sd[keep])
            acc[name].append(float(np.mean(est.predict(X_test) == y_test)))
            if name == "KLIEP":
                kliep_fits.append({"n_iter": int(est.n_iter_), "gap": float(est.gap_)})
        oracle = SVC().fit(X[100:200], yt[:100])
        acc["target trained"].append(float(np.mean(oracle.predict(X_test) == y_test)))
    table = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v} for k, v in acc.items()}
    table["KLIEP"]["fits"] = kliep_fits
    return table


def tradaboost_three_classes(n_estimators=20):
    """Issue 24's multi-class check: ``make_blobs(300, random_state=0)`` standardised, every other row
    target (labelled), accuracy on all 300 rows; one depth-2 tree against TrAdaBoost (depth-2 trees)."""
    X, y = make_blobs(n_samples=300, random_state=0)
    X = StandardScaler().fit_transform(X)
    sd = np.where(np.arange(len(X)) % 2 == 1, -1, 1)
    tree = DecisionTreeClassifier(max_depth=2, random_state=0)
    fits = {
        "one depth-2 tree": clone(tree).fit(X, y),
        "TrAdaBoost (SAMME, default)": TrAdaBoost(tree, n_estimators=n_estimators, random_state=0).fit(
            X, y, sample_domain=sd
        ),
        "TrAdaBoost (paper's second-half vote)": TrAdaBoost(
            tree, n_estimators=n_estimators, vote="second_half", random_state=0
        ).fit(X, y, sample_domain=sd),
    }
    return {k: float(np.mean(m.predict(X) == y)) for k, m in fits.items()}


def tradaboost_table(n_labelled=20, n_estimators=20):
    data = load_breast_cancer()
    X, y = data.data, data.target
    col = list(data.feature_names).index("mean texture")
    src = X[:, col] < np.median(X[:, col])
    tgt_idx = np.flatnonzero(~src)
    base = DecisionTreeClassifier(max_depth=3, random_state=0)
    acc = {k: [] for k in ["source only", "target only", "source + target", "TrAdaBoost"]}
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        lab = np.concatenate([rng.choice(tgt_idx[y[tgt_idx] == c], n_labelled // 2, replace=False) for c in (0, 1)])
        test = np.setdiff1d(tgt_idx, lab)
        mu, sigma = X[src].mean(0), X[src].std(0)
        Z = (X - mu) / sigma
        Zs, ys = Z[src], y[src]
        pooled_X, pooled_y = np.vstack([Zs, Z[lab]]), np.r_[ys, y[lab]]
        sd = np.r_[np.ones(len(Zs), int), -np.ones(len(lab), int)]
        fits = {
            "source only": clone(base).fit(Zs, ys),
            "target only": clone(base).fit(Z[lab], y[lab]),
            "source + target": clone(base).fit(pooled_X, pooled_y),
            "TrAdaBoost": TrAdaBoost(base, n_estimators=n_estimators, random_state=seed).fit(
                pooled_X, pooled_y, sample_domain=sd
            ),
        }
        for name, model in fits.items():
            acc[name].append(float(np.mean(model.predict(Z[test]) == y[test])))
    table = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v} for k, v in acc.items()}
    return {
        "n_source": int(src.sum()),
        "n_target": int((~src).sum()),
        "n_labelled_target": n_labelled,
        "n_estimators": n_estimators,
        "table": table,
    }


def _traced(fn):
    """``fn()``, its seconds and its peak traced heap in MiB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def kmm_kliep_cost(sizes=(5000, 50000), n_target=1000, n_features=5):
    """Seconds and peak heap of KMM's and KLIEP's weight estimation for each source size."""
    rows = []
    for n in sizes:
        X, _, sd = make_shifted_blobs(n, n_target, n_features=n_features, random_state=0)
        Xs, Xt = X[sd > 0], X[sd < 0]
        gamma = resolve_gamma("scale", X)
        runs = {
            "kmm": lambda Xs=Xs, Xt=Xt, gamma=gamma: kmm_weights(Xs, Xt, gamma=gamma, random_state=0, return_info=True),
            "kliep": lambda Xs=Xs, Xt=Xt, gamma=gamma: kliep_weights(
                Xs, Xt, gamma=[gamma * g for g in (0.1, 0.3, 1, 3, 10)], random_state=0, return_info=True
            ),
        }
        for name, fn in runs.items():
            (w, info), seconds, peak = _traced(fn)
            row = {
                "method": name,
                "n_source": n,
                "n_target": len(Xt),
                "n_features": Xs.shape[1],
                "seconds": round(seconds, 2),
                "peak_mib": round(peak, 1),
                "mean_weight": float(w.mean()),
            }
            if name == "kmm":
                row.update(solver=info["solver"], n_iter=info["n_iter"])
            else:
                row.update(gamma=info["gamma"], cv="5-fold likelihood CV over 5 widths", n_centers=100)
            rows.append(row)
            print(row, flush=True)
    return {"machine": platform.processor() or platform.machine(), "results": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transfer_classical.json"))
    parser.add_argument("--cost", action="store_true", help="only the KMM / KLIEP time and memory section")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000], help="source sizes for --cost")
    args = parser.parse_args(argv)
    path = Path(args.out)
    out = json.loads(path.read_text()) if path.exists() else {}
    if args.cost:
        out["kmm_kliep_cost"] = kmm_kliep_cost(args.sizes)
        return _write(path, out)
    t0 = time.perf_counter()
    out["covariate_shift"] = covariate_shift_table()
    t1 = time.perf_counter()
    out["tradaboost_breast_cancer"] = tradaboost_table()
    out["tradaboost_three_classes"] = tradaboost_three_classes()
    t2 = time.perf_counter()
    out["wall_seconds"] = {"covariate_shift": round(t1 - t0, 1), "tradaboost": round(t2 - t1, 1)}
    for section in ("covariate_shift",):
        for k, v in out[section].items():
            print(f"{section:16s} {k:20s} {v['mean']:.3f} +- {v['std']:.3f}")
    print("KLIEP fits", out["covariate_shift"]["KLIEP"]["fits"])
    for k, v in out["tradaboost_three_classes"].items():
        print(f"{'three classes':16s} {k:38s} {v:.3f}")
    for k, v in out["tradaboost_breast_cancer"]["table"].items():
        print(f"{'tradaboost':16s} {k:16s} {v['mean']:.3f} +- {v['std']:.3f}")
    print(out["wall_seconds"])
    return _write(path, out)


def _write(path: Path, out: dict) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
