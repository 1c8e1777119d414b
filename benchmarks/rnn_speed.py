"""Training episodes per second of the RNN-based meta-learners (MANN, its LSTM baseline, SNAIL, the
meta-learner LSTM) on Omniglot 5-way 1-shot, through the same steps as the trainer (sampling,
meta-loss, backward, outer optimizer step), with each method's configs/<method>_omniglot_5w1s.yaml.
Uses the real Omniglot data when found, else random images of the same shape. Each method is timed
for about ``--seconds`` seconds after one warm-up step (the default run takes well under a minute).

    OMP_NUM_THREADS=1 python benchmarks/rnn_speed.py [--seconds 4] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"mann": ("mann", []), "lstm": ("mann", ["algorithm.memory=false"]),
           "snail": ("snail", []), "meta_lstm": ("meta_lstm", [])}


def random_sampler(d, subset):
    from metatl.data import EpisodeSampler, TensorClassPool

    train = subset == "train"
    ways, shots = (d.train_ways or d.ways) if train else d.ways, (d.train_shots or d.shots) if train else d.shots
    queries = (d.train_queries or d.queries) if train else d.queries
    x = torch.rand(100 * 20, 1, d.image_size, d.image_size)
    s = EpisodeSampler(TensorClassPool(x, torch.arange(100).repeat_interleave(20)), ways, shots, queries)
    s.input_spec = {"in_channels": 1, "image_size": d.image_size}
    return s


def measure(method: str, seconds: float, data: str, device: str) -> dict:
    from metatl.config import load_config
    from metatl.data import build_sampler
    from metatl.engine.build import build_learner
    from metatl.engine.trainer import make_optimizer

    config, overrides = METHODS[method]
    cfg = load_config(ROOT / "configs" / f"{config}_omniglot_5w1s.yaml", overrides)
    train = (build_sampler if data == "omniglot" else random_sampler)(cfg.data, "train")
    torch.manual_seed(0)
    learner = build_learner(cfg, train).to(device)
    opt = make_optimizer(cfg, learner.parameters())
    g = torch.Generator().manual_seed(0)

    def step():
        loss, _ = learner.meta_loss([ep.to(device) for ep in train.sample_batch(cfg.train.meta_batch, g)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    step()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    elapsed = time.perf_counter() - start
    d = cfg.data
    return {"train_episodes_per_s": n * cfg.train.meta_batch / elapsed, "timed_steps": n,
            "train_episode": f"{d.train_ways or d.ways}-way {d.train_shots or d.shots}-shot, "
                             f"{d.train_queries or d.queries} queries/class, meta-batch {cfg.train.meta_batch}",
            "config": f"configs/{config}_omniglot_5w1s.yaml" + (f" --set {' '.join(overrides)}" if overrides else "")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rnn_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from metatl.engine.trainer import hardware

    try:
        from metatl.data.omniglot import load_images

        load_images()
        data = "omniglot"
    except (FileNotFoundError, ValueError):
        data = "random images (Omniglot not found)"
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else hardware()
    results = {"data": data, "seconds_per_method": args.seconds, "threads": args.threads, "device": args.device,
               "hardware": device_name, "torch_version": torch.__version__, "methods": {}}
    for m in args.methods:
        results["methods"][m] = r = measure(m, args.seconds, "omniglot" if data == "omniglot" else "random", args.device)
        print(f"{m:<10} {r['train_episodes_per_s']:8.2f} training episodes/s ({r['train_episode']})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
