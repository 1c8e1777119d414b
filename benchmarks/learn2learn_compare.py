"""Second-order MAML's 15-query Omniglot step (issue #2's speed targets) in metatl and in
learn2learn, interleaved in one process, so that the machine's drift (20-40% within minutes on our
shared 2-core machines) hits both alike, and the targets can be checked as ratios as well:
0.40 / 0.65 s (strided net) and 1.25 / 1.9 s (max-pool net) of learn2learn 0.2.0's time.

metatl: the trainer's step of ``configs/maml_omniglot_5w1s.yaml`` with 15 queries per class,
the execution settings of ``--execution`` (``_step.EXECUTION``; by default the config's own,
``defaults``; ``tuned``: ``train.executor:
threads_inner_vmap`` and ``model.fast: true``, today's defaults for this net). learn2learn: its
documented loop (for each task ``clone()``, ``adapt()`` on the support loss, the query loss divided by
the meta-batch and ``backward()``; then Adam), with its own Omniglot conv blocks
(``learn2learn.vision.models.cnn4.ConvBase``: conv, BatchNorm, ReLU [, 2x2 max-pool]), mean over
space (strided) or flattened (max-pool), and a linear head. Both draw their meta-batches (32 tasks,
5-way 1-shot) from the same sampler over the real Omniglot background set, at inner step size 0.4,
one inner step, Adam 1e-3. Before timing, one meta-gradient of each on the same batch and weights
is compared in float64, so the two steps are known to compute the same thing.

learn2learn is not a dependency of metatl. ``pip install learn2learn==0.2.0`` works where its
wheels or C sources build (Python < 3.11); on newer Pythons point ``--learn2learn-src`` at the
``learn2learn`` folder of its unpacked source archive: only the pure-Python modules used here
(``algorithms.maml``, ``algorithms.base_learner``, ``utils``, ``vision.models.cnn4``) are imported,
without the package's ``__init__`` (which needs torchvision, gym and compiled extensions).

    python benchmarks/learn2learn_compare.py [--learn2learn-src DIR] [--rounds 6] [--threads 2]
        [--clock wall|cpu] [--out benchmarks/results/learn2learn_compare.json]

``--clock cpu --threads 1`` times the process's CPU time on one thread: the work each step does,
which a busy machine inflates much less than the wall-clock time of two threads.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from _step import EXECUTION, MAML_5W1S, ROOT, interleaved, machine, matmul_gflops, training_step, write_json

TARGETS = {"conv4_stride": (0.40, 0.65), "conv4_pool": (1.25, 1.9)}  # issue #2: metatl, learn2learn 0.2.0


def import_learn2learn(src):
    """``(MAML, ConvBase, version)`` from an installed learn2learn, or from the package folder
    ``src`` without running its ``__init__``."""
    if src:
        src = Path(src).resolve()
        if not (src / "algorithms" / "maml.py").is_file():
            raise SystemExit(
                f"--learn2learn-src {src}: expected the 'learn2learn' package folder "
                f"(with algorithms/maml.py) of learn2learn's unpacked source archive."
            )
        for name, folder in [
            ("learn2learn", src),
            ("learn2learn.algorithms", src / "algorithms"),
            ("learn2learn.vision", src / "vision"),
            ("learn2learn.vision.models", src / "vision" / "models"),
        ]:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        text = (src / "_version.py").read_text() if (src / "_version.py").is_file() else ""
        version = text.split("=")[-1].strip().strip("'\"") if text else "unknown"
    else:
        try:
            import learn2learn
        except ImportError as error:
            raise SystemExit(
                f"learn2learn is not importable ({error}); install it or pass --learn2learn-src "
                f"(see this script's docstring)."
            ) from error
        version = learn2learn.__version__
    from learn2learn.algorithms.maml import MAML
    from learn2learn.vision.models.cnn4 import ConvBase

    return MAML, ConvBase, version


class L2LNet(torch.nn.Module):
    """learn2learn's four Omniglot conv blocks and a linear head: the strided net averages over
    space (as its ``OmniglotCNN``), the max-pool net flattens (1 x 1 x 64 for 28 x 28 input)."""

    def __init__(self, conv_base, variant: str):
        super().__init__()
        self.base = conv_base(hidden=64, channels=1, max_pool=variant == "pool", layers=4)
        self.variant = variant
        self.head = torch.nn.Linear(64, 5)

    def forward(self, x):
        h = self.base(x)
        return self.head(h.mean(dim=(2, 3)) if self.variant == "stride" else h.flatten(1))


def l2l_step(maml, optimizer, sampler, generator, meta_batch: int = 32):
    """One meta-iteration as learn2learn's MAML examples write it."""
    loss_fn = torch.nn.CrossEntropyLoss()
    batch = sampler.sample_batch(meta_batch, generator)
    optimizer.zero_grad()
    for ep in batch:
        learner = maml.clone()
        learner.adapt(loss_fn(learner(ep.support_x), ep.support_y))
        (loss_fn(learner(ep.query_x), ep.query_y) / meta_batch).backward()
    optimizer.step()


def same_meta_gradient(maml_cls, l2l_net, learner, sampler) -> float:
    """The largest difference between the two meta-gradients of one meta-batch (float64, the
    same weights), relative to the gradient's largest entry."""
    from metatl.data.episode import Episode

    l2l_net, model = l2l_net.double(), learner.model.double()
    ours = list(model.parameters())  # per block: conv weight and bias, BatchNorm weight and bias; head
    named = dict(l2l_net.named_parameters())
    theirs = [
        named[f"base.{i}.{layer}.{p}"] for i in range(4) for layer in ("conv", "normalize") for p in ("weight", "bias")
    ] + [named["head.weight"], named["head.bias"]]
    if [p.shape for p in ours] != [p.shape for p in theirs]:
        raise RuntimeError("the two nets' parameters do not line up")
    with torch.no_grad():
        for a, b in zip(theirs, ours):
            a.copy_(b)
    batch = [
        Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y)
        for ep in sampler.sample_batch(4, torch.Generator().manual_seed(1))
    ]
    maml = maml_cls(l2l_net, lr=learner.inner_lr, first_order=False)
    loss_fn = torch.nn.CrossEntropyLoss()
    for ep in batch:
        clone = maml.clone()
        clone.adapt(loss_fn(clone(ep.support_x), ep.support_y))
        (loss_fn(clone(ep.query_x), ep.query_y) / len(batch)).backward()
    loss, _ = learner.meta_loss(batch)
    mine = torch.autograd.grad(loss, ours)
    scale = max(g.abs().max().item() for g in mine)
    diff = max((g - p.grad).abs().max().item() for g, p in zip(mine, theirs)) / scale
    l2l_net.float(), model.float()
    l2l_net.zero_grad()
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--learn2learn-src", default=None, help="learn2learn's package folder, imported without its __init__"
    )
    ap.add_argument("--rounds", type=int, default=6, help="rounds of 2 steps each, per library")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall-clock time, or the process's CPU time (meaningful with --threads 1)",
    )
    ap.add_argument("--backbones", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument(
        "--execution",
        default="defaults",
        choices=list(EXECUTION),
        help="metatl's execution settings (benchmarks/_step.py's EXECUTION)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learn2learn_compare.json"))
    args = ap.parse_args()
    maml_cls, conv_base, version = import_learn2learn(args.learn2learn_src)

    from metatl.engine.trainer import keep_freed_memory

    keep_freed_memory()  # as the trainer does on CPUs; the same process serves both libraries
    torch.set_num_threads(args.threads)
    record = {
        "benchmark": "learn2learn_compare",
        **machine(args.threads),
        "learn2learn": version,
        "execution": EXECUTION[args.execution],
        "rounds": args.rounds,
        "clock": args.clock,
        "meta_batch": 32,
        "queries_per_class": 15,
        "inner_lr": 0.4,
        "results": {},
    }
    for backbone in args.backbones:
        overrides = [f"model.name={backbone}", "data.train_queries=15", *EXECUTION[args.execution]]
        cfg, sampler, learner, metatl_step = training_step(MAML_5W1S, overrides)
        if learner.inner_lr != 0.4 or cfg.train.meta_batch != 32 or learner.inner_steps != 1:
            raise RuntimeError("the config no longer has the targets' inner step size and meta-batch")
        torch.manual_seed(0)
        net = L2LNet(conv_base, "stride" if backbone == "conv4_stride" else "pool")
        check = same_meta_gradient(maml_cls, net, learner, sampler)
        maml = maml_cls(net, lr=0.4, first_order=False)
        optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        times = interleaved(
            {"metatl": metatl_step, "learn2learn": functools.partial(l2l_step, maml, optimizer, sampler, generator)},
            args.rounds,
            2,
            clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        )
        ours, theirs = (statistics.median(times[k]) for k in ("metatl", "learn2learn"))
        target, l2l_then = TARGETS[backbone]
        res = {
            name: {"seconds_median": statistics.median(t), "seconds_min": min(t), "seconds": t}
            for name, t in times.items()
        }
        res.update(
            ratio=ours / theirs,
            target_seconds=target,
            learn2learn_seconds_in_issue=l2l_then,
            target_ratio=target / l2l_then,
            meta_gradient_max_rel_difference_float64=check,
        )
        record["results"][backbone] = res
        print(
            f"{backbone}: metatl {ours:.3f} s, learn2learn {theirs:.3f} s, ratio {ours / theirs:.3f} "
            f"(target {target} / {l2l_then} = {target / l2l_then:.3f}); float64 meta-gradients differ by "
            f"{check:.1e}",
            flush=True,
        )
    record["matmul_gflops_at_end"] = matmul_gflops(args.threads)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
