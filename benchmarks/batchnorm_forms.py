"""Seconds per MAML meta-iteration in the vmap path for formulations of BatchStatsNorm2d's exact
(elementary) computation, interleaved in one process so that the machine's drift hits all alike.

    python benchmarks/batchnorm_forms.py [--rounds 8] [--steps 3] [--out benchmarks/results/batchnorm_forms.json]

The step is the time-to-accuracy protocol's (configs/maml_omniglot_5w1s.yaml, vmap over 32 tasks,
1 query per class, second order). Each form is checked to give the shipped form's meta-gradient
(relative difference printed and recorded). Uses the real Omniglot data (``METATL_DATA_DIR``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _step import ROOT, machine, training_step, write_json


def plain(self, x):
    """The formula as written: means, square(), then scale and weight one after the other."""
    dims = (0, 2, 3)
    centred = x - x.mean(dim=dims, keepdim=True)
    scale = torch.rsqrt(centred.square().mean(dim=dims, keepdim=True) + self.eps)
    return centred * scale * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def moments(self, x):
    """E[x^2] - E[x]^2: no centred tensor, but cancellation when |mean| >> std (not shipped)."""
    dims, inv_n = (0, 2, 3), 1.0 / (x.shape[0] * x.shape[2] * x.shape[3])
    m = x.sum(dim=dims, keepdim=True) * inv_n
    a = torch.rsqrt((x * x).sum(dim=dims, keepdim=True) * inv_n - m * m + self.eps) * self.weight.view(1, -1, 1, 1)
    return torch.addcmul(self.bias.view(1, -1, 1, 1) - m * a, x, a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per form per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batchnorm_forms.json"))
    args = ap.parse_args()

    from metatl.engine.trainer import keep_freed_memory
    from metatl.nn import backbones

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    facts = machine(args.threads)
    cfg, sampler, learner, step = training_step(overrides=["algorithm.batch_tasks=true"])
    shipped = backbones.BatchStatsNorm2d.forward

    def wrap(form):
        def forward(self, x):
            if not backbones._in_func_transform(x):
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return form(self, x)
        return forward

    forms = {"shipped": shipped, "plain": wrap(plain), "moments": wrap(moments)}
    batch = sampler.sample_batch(cfg.train.meta_batch, torch.Generator().manual_seed(5))
    grads, diffs = {}, {}
    for name, forward in forms.items():
        backbones.BatchStatsNorm2d.forward = forward
        loss, _ = learner.meta_loss(batch)
        grads[name] = torch.autograd.grad(loss, list(learner.parameters()))
        diffs[name] = max(((a - b).abs().max() / b.abs().max()).item()
                          for a, b in zip(grads[name], grads["shipped"]) if b.abs().max() > 1e-6)

    times = {name: [] for name in forms}
    for forward in forms.values():  # warm-up
        backbones.BatchStatsNorm2d.forward = forward
        step()
    for _ in range(args.rounds):
        for name, forward in forms.items():
            backbones.BatchStatsNorm2d.forward = forward
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    backbones.BatchStatsNorm2d.forward = shipped
    results = {name: {"seconds_per_iter_median": statistics.median(t), "seconds_per_iter_min": min(t),
                      "steps": len(t), "max_relative_gradient_difference_to_shipped": diffs[name]}
               for name, t in times.items()}
    for name, r in results.items():
        print(f"{name:8s} {r['seconds_per_iter_median']:.4f} s/iter median, gradient difference "
              f"{r['max_relative_gradient_difference_to_shipped']:.1e}")
    write_json(args.out, {"benchmark": "batchnorm_forms", **facts, "rounds": args.rounds, "steps": args.steps,
                          "results": results})


if __name__ == "__main__":
    main()
