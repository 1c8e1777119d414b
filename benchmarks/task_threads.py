"""A meta-batch's tasks in parallel CPU threads (``algorithm.task_threads``, :mod:`metatl.meta.threads`)
against one task after another, each pair interleaved in one process (so the machine's drift hits
both alike), through the trainer's step (episode sampling, meta-loss, backward, Adam):

- ``maml_inner``: second-order MAML's 15-query step, ``batch_tasks: inner``, ``model.channels_last:
  true`` (the speed targets' step);
- ``maml_loop``: the same with ``batch_tasks: false`` (every task's inner loop on its own);
- ``fomaml_inner``: first-order MAML, as ``maml_inner``;
- ``reptile``: Reptile, 1 inner step on the whole support set (as ``maml_speed.py``).

``task_threads`` is ``1`` against ``--threads`` (each thread then runs one intra-op thread).
Peak memory is ``maml_speed.py``'s business (a fresh process per setting).

    python benchmarks/task_threads.py [--rounds 4] [--threads 2] [--out benchmarks/results/task_threads.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _step import MAML_5W1S, ROOT, interleaved, machine, training_step, write_json

REPTILE_5W1S = ROOT / "configs" / "reptile_omniglot_5w1s.yaml"
CASES = {  # config, overrides
    "maml_inner": (MAML_5W1S, ["algorithm.batch_tasks=inner", "model.channels_last=true"]),
    "maml_loop": (MAML_5W1S, ["algorithm.batch_tasks=false", "model.channels_last=true"]),
    "fomaml_inner": (MAML_5W1S, ["algorithm.batch_tasks=inner", "model.channels_last=true",
                                 "algorithm.first_order=true"]),
    "reptile": (REPTILE_5W1S, ["algorithm.inner_steps=1", "algorithm.inner_batch=null", "train.meta_batch=32",
                               "data.train_shots=1",
                               "model.channels_last=true"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--backbones", nargs="+", default=["conv4_stride", "conv4_pool"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "task_threads.json"))
    args = ap.parse_args()

    from metatl.engine.trainer import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    record = {"benchmark": "task_threads", **machine(args.threads), "rounds": args.rounds,
              "meta_batch": 32, "queries_per_class": 15, "results": {}}
    for backbone in args.backbones:
        for case in args.cases:
            config, overrides = CASES[case]
            overrides = [f"model.name={backbone}", "data.train_queries=15", *overrides]
            variants = {f"task_threads_{n}": training_step(config, overrides + [f"algorithm.task_threads={n}"])[3]
                        for n in (1, args.threads)}
            times = interleaved(variants, args.rounds, 2)
            res = {name: {"seconds_median": statistics.median(t), "seconds_min": min(t), "calls": len(t)}
                   for name, t in times.items()}
            serial, threaded = (res[f"task_threads_{n}"]["seconds_median"] for n in (1, args.threads))
            res["speed_up"] = serial / threaded
            record["results"][f"{backbone}/{case}"] = res
            print(backbone, case, f"1 thread {serial:.3f} s  {args.threads} threads {threaded:.3f} s  "
                  f"speed-up {res['speed_up']:.3f}", flush=True)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
