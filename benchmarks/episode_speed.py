"""Episodes per second of meta-training (and, for the metric-based learners, of evaluation) on
Omniglot 5-way 1-shot: Prototypical, Matching and Relation Networks, and the RNN-based learners
(MANN, its LSTM baseline, SNAIL, the meta-learner LSTM).

Each method uses its configs/<method>_omniglot_5w1s.yaml, so training episodes have the paper's shape
(ProtoNets: 60-way 1-shot with 5 queries per class; Matching: 5-way 1-shot with 15 queries, meta-batch
32; Relation: 5-way 1-shot with 19 queries; ``lstm`` is MANN's config with
``algorithm.memory=false``). Training is timed through the real trainer step
(sampling, meta-loss, backward, Adam step) and reported per *episode*; evaluation is
``learner.adapt`` + prediction on 5-way 1-shot test episodes with 15 queries per class (metric
learners only). Each
measurement runs for about ``--seconds`` seconds after one warm-up step. Uses the real Omniglot data
when found, else random images of the same shape (speed does not depend on pixel values).

    OMP_NUM_THREADS=1 python benchmarks/episode_speed.py [--seconds 3] [--threads 1] [--methods ...]
    python benchmarks/episode_speed.py --methods protonet --threads 2 --set train.precision=bfloat16 --out ...

``--set`` overrides every method's config (as ``metatl train --set``); ``train.precision=bfloat16``
times the meta-loss under bfloat16 autocast as the trainer runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = {  # name -> (config, overrides, has a test-time adapt to time)
    "protonet": ("protonet", [], True),
    "matching": ("matching", [], True),
    "relation": ("relation", [], True),
    "mann": ("mann", [], False),
    "lstm": ("mann", ["algorithm.memory=false"], False),
    "snail": ("snail", [], False),
    "meta_lstm": ("meta_lstm", [], False),
}
ROOT = Path(__file__).resolve().parents[1]


def random_sampler(cfg_data, subset):
    from metatl.data import EpisodeSampler, TensorClassPool

    ways, shots, queries = (
        (
            (cfg_data.train_ways or cfg_data.ways),
            (cfg_data.train_shots or cfg_data.shots),
            (cfg_data.train_queries or cfg_data.queries),
        )
        if subset == "train"
        else (cfg_data.ways, cfg_data.shots, cfg_data.queries)
    )
    x = torch.rand(100 * 20, 1, cfg_data.image_size, cfg_data.image_size)
    s = EpisodeSampler(TensorClassPool(x, torch.arange(100).repeat_interleave(20)), ways, shots, queries)
    s.input_spec = {"in_channels": 1, "image_size": cfg_data.image_size}
    return s


def timed(fn, seconds: float) -> tuple:
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n, time.perf_counter() - start


def measure(method: str, seconds: float, data: str, overrides=(), device: str = "cpu") -> dict:
    from metatl.build import build_learner
    from metatl.config import load_config
    from metatl.data import build_sampler
    from metatl.engine.trainer import make_optimizer

    config, own, timed_eval = METHODS[method]
    cfg = load_config(ROOT / "configs" / f"{config}_omniglot_5w1s.yaml", [*own, *overrides])
    make = build_sampler if data == "omniglot" else random_sampler
    train, test = make(cfg.data, "train"), make(cfg.data, "test")
    torch.manual_seed(0)
    learner = build_learner(cfg, train).to(device)
    opt = make_optimizer(cfg, learner.parameters())
    g = torch.Generator().manual_seed(0)

    def train_step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.train.precision == "bfloat16"):
            loss, _ = learner.meta_loss([ep.to(device) for ep in train.sample_batch(cfg.train.meta_batch, g)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    def eval_episode():
        ep = test.sample(g)
        with torch.no_grad():
            learner.adapt(ep.support_x, ep.support_y)(ep.query_x)

    learner.train()
    steps, t_train = timed(train_step, seconds)
    d = cfg.data
    out = {
        "train_episodes_per_s": steps * cfg.train.meta_batch / t_train,
        "train_steps_per_s": steps / t_train,
        "train_episode": f"{d.train_ways or d.ways}-way {d.train_shots or d.shots}-shot, "
        f"{d.train_queries or d.queries} queries/class, meta-batch {cfg.train.meta_batch}",
        "timed_train_steps": steps,
        "config": f"configs/{config}_omniglot_5w1s.yaml" + (f" --set {' '.join(own)}" if own else ""),
    }
    if timed_eval and device == "cpu":
        learner.eval()
        episodes, t_eval = timed(eval_episode, seconds)
        out.update(
            eval_episodes_per_s=episodes / t_eval,
            timed_eval_episodes=episodes,
            eval_episode=f"{d.ways}-way {d.shots}-shot, {d.queries} queries/class",
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every method")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "episode_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from metatl.engine.trainer import hardware

    try:
        from metatl.data.omniglot import load_images

        load_images()
        data = "omniglot"
    except (FileNotFoundError, ValueError):
        data = "random images (Omniglot not found)"
    hardware_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else hardware()
    results = {
        "data": data,
        "seconds_per_measurement": args.seconds,
        "threads": args.threads,
        "device": args.device,
        "hardware": hardware_name,
        "torch_version": torch.__version__,
        "overrides": args.set,
        "methods": {},
    }
    for m in args.methods:
        kind = "omniglot" if data == "omniglot" else "random"
        results["methods"][m] = r = measure(m, args.seconds, kind, args.set, args.device)
        evaluation = (
            f"; eval {r['eval_episodes_per_s']:8.1f} episodes/s ({r['eval_episode']})" if "eval_episode" in r else ""
        )
        print(
            f"{m:<9} train {r['train_episodes_per_s']:8.1f} episodes/s ({r['train_episode']}){evaluation}", flush=True
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
