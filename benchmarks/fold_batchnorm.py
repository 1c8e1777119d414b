"""The conv nets' first BatchNorm folded into its convolution (``model.fold_first_norm``, the
default; ``metatl.nn.backbones.conv_batch_stats_norm``) against the two layers run as they are, on
the CPU, each pair interleaved in one process (so the machine's drift hits both alike):

- ``plain_query``: an ordinary forward and backward pass over a meta-batch's 32 query sets
  (75 images, channels-last), one shared set of weights;
- ``maml_step_inner``: second-order MAML's 15-query trainer step, ``batch_tasks: inner``,
  ``model.channels_last: true`` (the speed targets' step);
- ``maml_step_vmap_compiled`` (strided net only; ``--no-compile`` leaves it out): the
  time-to-accuracy protocol's step, 1 query per class, ``batch_tasks: true``, ``compile: true``
  (compiled before timing).

    python benchmarks/fold_batchnorm.py [--rounds 4] [--out benchmarks/results/fold_batchnorm.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _step import ROOT, interleaved, machine, training_step, write_json
from maml_step_floor import plain_pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled 1-query step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fold_batchnorm.json"))
    args = ap.parse_args()

    from metatl.engine.trainer import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    record = {"benchmark": "fold_batchnorm", **machine(args.threads), "rounds": args.rounds,
              "meta_batch": 32, "results": {}}

    def steps(overrides):
        return {fold: training_step(overrides=overrides + [f"model.fold_first_norm={fold}"])
                for fold in ("true", "false")}

    for backbone in ("conv4_stride", "conv4_pool"):
        inner = steps([f"model.name={backbone}", "data.train_queries=15", "algorithm.batch_tasks=inner",
                       "model.channels_last=true"])
        cfg, sampler, _, _ = inner["true"]
        batch = sampler.sample_batch(cfg.train.meta_batch, torch.Generator().manual_seed(1))
        query_sets = [(ep.query_x, ep.query_y) for ep in batch]
        cases = {"plain_query": {fold: plain_pass(built[2].model, query_sets) for fold, built in inner.items()},
                 "maml_step_inner": {fold: built[3] for fold, built in inner.items()}}
        if backbone == "conv4_stride" and not args.no_compile:
            vmap = steps([f"model.name={backbone}", "algorithm.batch_tasks=true", "algorithm.compile=true"])
            cases["maml_step_vmap_compiled"] = {fold: step for fold, (_, _, _, step) in vmap.items()}
        for case, variants in cases.items():
            times = interleaved({f"fold_{fold}": run for fold, run in variants.items()}, args.rounds, 2)
            res = {name: {"seconds_median": statistics.median(t), "seconds_min": min(t), "calls": len(t)}
                   for name, t in times.items()}
            res["speed_up"] = res["fold_false"]["seconds_median"] / res["fold_true"]["seconds_median"]
            record["results"][f"{backbone}/{case}"] = res
            medians = "  ".join(f"{n} {r['seconds_median']:.3f} s" for n, r in res.items() if n != "speed_up")
            print(backbone, case, medians, f"speed-up {res['speed_up']:.3f}", flush=True)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
