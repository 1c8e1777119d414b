"""Cross-domain digit episodes (data.name: digits_episodes) and class-index training labels."""

import pytest
import torch

from metatl.config import ConfigError, from_dict
from metatl.data import EpisodeSampler, TensorClassPool, build_sampler


def config(**data):
    return from_dict({"algorithm": {"name": "protonet"}, "model": {"name": "conv4_pool"}, "data": data})


def test_sklearn_digit_episodes_match_omniglot_convention():
    cfg = config(name="digits_episodes", domain="sklearn_digits", ways=5, shots=3, queries=4)
    sampler = build_sampler(cfg.data, "test")
    ep = sampler.sample(torch.Generator().manual_seed(0))
    assert ep.support_x.shape == (15, 1, 28, 28) and ep.query_x.shape == (20, 1, 28, 28)
    assert ep.support_y.tolist() == [c for c in range(5) for _ in range(3)]
    # ink = 1 on a 0 background, as Omniglot's inverted scans: the frame's border is empty
    assert ep.support_x.max() == 1.0 and ep.support_x.min() == 0.0
    assert ep.support_x[..., :3, :].abs().max() == 0 and ep.support_x.mean() < 0.3
    again = build_sampler(cfg.data, "test").sample(torch.Generator().manual_seed(0))
    assert torch.equal(ep.query_x, again.query_x)
    # test episodes come from the test images (599), train episodes from the others (1,198)
    assert sum(sampler.pool.counts) == 599 and sum(build_sampler(cfg.data, "train").pool.counts) == 1198
    assert sampler.input_spec == {"in_channels": 1, "image_size": 28}


def test_digit_episodes_refuse_what_the_data_cannot_supply():
    with pytest.raises(ConfigError, match="at most 10 ways"):
        config(name="digits_episodes", domain="sklearn_digits", ways=11).data.check_config(None)
    with pytest.raises(ConfigError, match="data.domain must be one of mnist, usps, sklearn_digits"):
        config(name="digits_episodes", domain="svhn").data.check_config(None)
    cfg = config(name="digits_episodes", domain="sklearn_digits", shots=50, queries=15)
    with pytest.raises(ValueError, match="smallest class .*data.shots=50, data.queries=15"):
        build_sampler(cfg.data, "test")


def test_mnist_and_usps_episodes(omniglot_dir):
    for domain in ("mnist", "usps"):
        cfg = config(name="digits_episodes", domain=domain, data_dir=str(omniglot_dir), shots=5)
        ep = build_sampler(cfg.data, "test").sample(torch.Generator().manual_seed(1))
        assert ep.support_x.shape == (25, 1, 28, 28) and ep.query_x.shape == (75, 1, 28, 28)
        assert ep.support_x.max() <= 1.0 and ep.support_x[..., :2, :].abs().max() == 0


def test_class_labels_index_every_class():
    x = torch.arange(40.0).view(40, 1)
    y = torch.arange(40) % 8  # 8 classes of 5; x // 1 % 8 is the class
    sampler = EpisodeSampler(TensorClassPool(x, y), ways=3, shots=2, queries=1, labels="class")
    assert sampler.out_features == 8
    for ep in sampler.sample_batch(4, torch.Generator().manual_seed(0)):
        assert torch.equal(ep.support_x.flatten().long() % 8, ep.support_y)
        assert torch.equal(ep.query_x.flatten().long() % 8, ep.query_y)
        assert len(set(ep.support_y.tolist())) == 3
    with pytest.raises(ValueError, match="use 'episode'"):
        EpisodeSampler(TensorClassPool(x, y), 3, 2, 1, labels="global")


def test_train_labels_key_applies_to_training_only():
    cfg = config(name="digits_episodes", domain="sklearn_digits", train_labels="class", train_ways=10)
    assert build_sampler(cfg.data, "train").out_features == 10
    test = build_sampler(cfg.data, "test")
    assert test.out_features == 5 and test.sample(torch.Generator()).support_y.max() == 4
    with pytest.raises(ConfigError, match="data.train_labels must be"):
        config(name="omniglot", train_labels="global").data.check_config(None)
