"""MAML's execution paths on a GPU: each one's meta-gradient against the per-task loop on the CPU in
float64 (the reference), and its time per meta-iteration.

Paths: ``batch_tasks`` false (per-task loop), ``"inner"`` (the inner loops as one vmap) and true
(one vmap over tasks, also compiled with ``compile: true``), each with the conv nets'
``channels_last`` option off and on, with the first BatchNorm folded (the default) and, for the
loop, unfolded. Random Omniglot-shaped episodes (5-way 1-shot, ``--queries`` per class), the
strided conv net, second-order MAML with 1 inner step, ``--tasks`` tasks.

- ``float64``: the path on the GPU in float64; its largest difference from the reference, relative
  to the reference gradient's largest entry, should be rounding (about 1e-12 or less).
- ``float32``: the same in float32, and the seconds per meta-iteration (meta-loss and backward,
  synchronised, median of ``--iters`` after 2 warm-up ones; a compiled path compiles in its
  warm-up). cuDNN's float32 convolutions use TF32 unless ``torch.backends.cudnn.allow_tf32`` is
  off (PyTorch's default is on), so the float32 differences are TF32's.

    python benchmarks/gpu_paths.py [--device cuda] [--tasks 8] [--queries 15] [--no-tf32] [--no-compile]
        [--out benchmarks/results/gpu_paths.json]

Runs on the CPU too (``--device cpu``), as a check of the script.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _step import ROOT, machine, write_json


def episodes(tasks: int, queries: int, seed: int = 0):
    from metatl.data.episode import Episode

    g = torch.Generator().manual_seed(seed)
    return [Episode(torch.rand(5, 1, 28, 28, generator=g), torch.arange(5),
                    torch.rand(5 * queries, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(queries))
            for _ in range(tasks)]


def cast(batch, device, dtype):
    """The episodes on ``device``, their images in ``dtype``."""
    return [type(ep)(*(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                       for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y))) for ep in batch]


def meta_gradient(learner, batch):
    learner.model.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    return [p.grad.detach().clone() for p in learner.model.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-tf32", action="store_true", help="torch.backends.cudnn.allow_tf32 = False (full float32 "
                    "convolutions)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled path")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_paths.json"))
    args = ap.parse_args()

    from metatl.meta import MAML
    from metatl.nn import conv4_stride

    torch.set_num_threads(args.threads)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base = conv4_stride(out_features=5, fold_first_norm=False)
    batch = episodes(args.tasks, args.queries)
    reference = meta_gradient(MAML(copy.deepcopy(base).double(), inner_lr=0.4, task_threads=1),
                              cast(batch, "cpu", torch.float64))
    scale = max(g.abs().max().item() for g in reference)
    paths = [(bt, cl, fold, False) for bt in (False, "inner", True) for cl in (False, True) for fold in (True, False)
             if fold or bt is False] + ([] if args.no_compile else [(True, False, True, True)])
    record = {"benchmark": "gpu_paths", **machine(args.threads), "device": args.device,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "tasks": args.tasks, "queries_per_class": args.queries,
              "reference": "per-task loop, CPU, float64, unfolded", "results": []}
    for batch_tasks, channels_last, fold, compiled in paths:
        row = {"batch_tasks": batch_tasks, "channels_last": channels_last, "fold_first_norm": fold, "compile": compiled}
        for dtype in (torch.float64, torch.float32):
            model = conv4_stride(out_features=5, channels_last=channels_last, fold_first_norm=fold)
            model.load_state_dict(base.state_dict())
            model = model.to(device=device, dtype=dtype)
            learner = MAML(model, inner_lr=0.4, batch_tasks=batch_tasks, compile=compiled)
            data = cast(batch, device, dtype)
            times = []
            for i in range(2 + (args.iters if dtype == torch.float32 else 0)):
                sync()
                start = time.perf_counter()
                grads = meta_gradient(learner, data)
                sync()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            err = max((g.double().cpu() - r).abs().max().item() for g, r in zip(grads, reference)) / scale
            name = "float64" if dtype == torch.float64 else "float32"
            row[f"{name}_max_rel_diff"] = err
            if times:
                row["float32_seconds_median"] = statistics.median(times)
        record["results"].append(row)
        print(row, flush=True)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
