"""How far second-order MAML's 15-query step is above the cost of an ordinary training pass over
the same images: the floor under the speed targets of issue #2.

For each conv net, one process times, interleaved in rounds (so the machine's drift hits all alike):

- ``plain_query``: forward and backward of the cross-entropy over the meta-batch's 32 query sets
  (75 images each, one set per call, as the per-task loop runs them) with one shared set of weights:
  ordinary supervised training on those images. Second-order MAML must do at least this much (on
  each task's adapted weights) and more;
- ``plain_support_query``: the same over each task's 5 support and 75 query images;
- ``maml_step``: the trainer's real second-order step (per-task loop, 15 queries per class,
  episode sampling and Adam included), as ``benchmarks/maml_speed.py`` times it;
- ``maml_step_inner_vmap``: the same step with ``algorithm.batch_tasks=inner`` (the inner loops as
  one vmap over tasks, the query losses task by task);
- ``maml_step_vmap``, with ``--vmap``: the same step with ``algorithm.batch_tasks=true`` (all of it
  as one vmap over tasks);
- ``plain_query_channels_last`` and ``maml_step_inner_vmap_channels_last``: ``plain_query`` and
  ``maml_step_inner_vmap`` with ``model.channels_last=true`` (the layers outside vmap run in the
  channels-last layout).

``--queries Q`` sets the query examples per class (default 15, the speed targets' episodes; 1 is
MAML's training protocol), ``--backbones`` the nets.

``--compile`` adds ``plain_query_compiled``: the same plain pass through ``torch.compile(model)``
(compiled before timing; the compile time is recorded).

    python benchmarks/maml_step_floor.py [--rounds 4] [--compile] [--vmap] [--queries 15]
        [--backbones conv4_stride conv4_pool] [--out benchmarks/results/maml_step_floor.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _step import ROOT, interleaved, machine, training_step, write_json

BACKBONES = ("conv4_stride", "conv4_pool")


def plain_pass(model, sets):
    """Forward and backward of the cross-entropy over each ``(x, y)`` in ``sets``, gradients summed."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        for x, y in sets:
            F.cross_entropy(model(x), y).backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="calls per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the plain pass compiled")
    ap.add_argument("--vmap", action="store_true", help="also time the step with batch_tasks=true")
    ap.add_argument("--queries", type=int, default=15, help="query examples per class")
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "maml_step_floor.json"))
    args = ap.parse_args()

    from metatl.engine.trainer import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    facts = machine(args.threads)
    record = {"benchmark": "maml_step_floor", **facts, "rounds": args.rounds, "steps": args.steps,
              "meta_batch": 32, "queries_per_class": args.queries, "results": {}}
    for backbone in args.backbones:
        def step(batch_tasks: str, channels_last: bool = False):
            return training_step(overrides=[f"model.name={backbone}", f"data.train_queries={args.queries}",
                                            f"algorithm.batch_tasks={batch_tasks}",
                                            f"model.channels_last={str(channels_last).lower()}"])

        cfg, sampler, learner, maml_step = step("false")
        batch = sampler.sample_batch(cfg.train.meta_batch, torch.Generator().manual_seed(1))
        model = learner.model  # the step's own net: same weights, layout and BatchNorm layer
        _, _, learner_cl, inner_cl = step("inner", channels_last=True)
        variants = {
            "maml_step": maml_step,
            "maml_step_inner_vmap": step("inner")[3],
            "maml_step_inner_vmap_channels_last": inner_cl,
            "plain_query": plain_pass(model, [(ep.query_x, ep.query_y) for ep in batch]),
            "plain_query_channels_last": plain_pass(learner_cl.model, [(ep.query_x, ep.query_y) for ep in batch]),
            "plain_support_query": plain_pass(model, [(torch.cat([ep.support_x, ep.query_x]),
                                                       torch.cat([ep.support_y, ep.query_y])) for ep in batch]),
        }
        if args.vmap:
            variants["maml_step_vmap"] = step("true")[3]
        compile_seconds = None
        if args.compile:
            start = time.perf_counter()
            variants["plain_query_compiled"] = plain_pass(torch.compile(model), [(ep.query_x, ep.query_y) for ep in batch])
            variants["plain_query_compiled"]()
            compile_seconds = time.perf_counter() - start
        times = interleaved(variants, args.rounds, args.steps)
        res = {name: {"seconds_median": statistics.median(t), "seconds_min": min(t), "calls": len(t)}
               for name, t in times.items()}
        if compile_seconds is not None:
            res["plain_query_compiled"]["compile_seconds"] = compile_seconds
        pools = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                        if isinstance(m, torch.nn.MaxPool2d)})
        record["results"][backbone] = {**res, "max_pool": pools}
        print(backbone, "  ".join(f"{name} {r['seconds_median']:.3f} s" for name, r in res.items()), pools, flush=True)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
