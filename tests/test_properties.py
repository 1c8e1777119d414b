"""Property tests (hypothesis): the config loader and the episode samplers, on random input.

The loader returns a config or raises a ConfigError, never another exception; the samplers give
episodes of the requested shape with disjoint support and query sets, or a ValueError that names
the problem.
"""

import string

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from metatl.config import Config, ConfigError, from_dict, load_config  # noqa: E402
from metatl.data import ClassPool, EpisodeSampler, Sinusoid, build_sampler  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTIONS = ["name", "algorithm", "model", "data", "train", "eval"]
KEYS = [
    "name",
    "maml",
    "protonet",
    "mlp",
    "conv4_pool",
    "sinusoid",
    "omniglot",
    "image_folder",
    "mnist_usps",
    "ways",
    "shots",
    "queries",
    "train_ways",
    "train_queries",
    "train_subset",
    "split",
    "image_size",
    "split_fractions",
    "iterations",
    "meta_batch",
    "lr",
    "lr_schedule",
    "grad_clip",
    "val_every",
    "num_threads",
    "time_budget_min",
    "snapshot_minutes",
    "ema_decay",
    "precision",
    "episodes",
    "inner_steps",
    "extra_steps",
    "inner_lr",
    "first_order",
    "batch_tasks",
    "hidden",
    "filters",
    "bn_mode",
    "direction",
    "target_labels_fraction",
    "seed",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.just(10**400),
    st.just(-(2**70)),
    st.floats(allow_nan=True),
    st.sampled_from(KEYS),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=8,
)
sections = st.dictionaries(st.sampled_from(KEYS + ["bogus"]), values, max_size=5)
configs = st.dictionaries(st.sampled_from(SECTIONS + ["bogus"]), st.one_of(sections, values), max_size=6)


def loads_or_config_error(load):
    try:
        cfg = load()
    except ConfigError as err:
        assert err.args and isinstance(err.args[0], str) and err.args[0]
        return err
    assert isinstance(cfg, Config)
    assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # what is stored loads back the same
    return cfg


@FAST
@given(configs)
def test_from_dict_returns_a_config_or_a_config_error(raw):
    assert isinstance(loads_or_config_error(lambda: from_dict(raw)), (Config, ConfigError))


@FAST
@given(
    st.sampled_from(["maml", "protonet", "reptile"]),
    st.sampled_from(["mlp", "conv4_pool"]),
    st.sampled_from(["sinusoid", "omniglot", "image_folder", "mnist_usps"]),
    st.lists(
        st.tuples(st.sampled_from(["algorithm", "model", "data", "train", "eval"]), st.sampled_from(KEYS), values),
        max_size=4,
    ),
)
def test_near_valid_configs_load_or_say_why(algorithm, model, data, changes):
    raw = {"algorithm": {"name": algorithm}, "model": {"name": model}, "data": {"name": data}}
    for section, key, value in changes:
        raw.setdefault(section, {})[key] = value
    assert isinstance(loads_or_config_error(lambda: from_dict(raw)), (Config, ConfigError))


@FAST
@given(st.text(alphabet=string.printable, max_size=80), st.lists(st.text(max_size=20), max_size=3))
def test_config_files_and_overrides_of_any_text(tmp_path, text, overrides):
    path = tmp_path / "random.yaml"
    path.write_text("algorithm: {name: maml}\nmodel: {name: mlp}\ndata: {name: sinusoid}\n" + text)
    assert isinstance(loads_or_config_error(lambda: load_config(path, overrides)), (Config, ConfigError))


@FAST
@given(configs)
def test_config_files_of_any_yaml_structure(tmp_path, raw):
    path = tmp_path / "random.yaml"
    try:
        path.write_text(yaml.safe_dump(raw))
    except (yaml.YAMLError, ValueError):
        return
    assert isinstance(loads_or_config_error(lambda: load_config(path)), (Config, ConfigError))


class CountPool(ClassPool):
    """Classes of the given sizes; an example is its global index, so overlaps can be seen."""

    def __init__(self, counts):
        self.counts = list(counts)
        self.starts = [sum(self.counts[:c]) for c in range(len(self.counts))]

    def get(self, c, idx):
        return (self.starts[c] + idx).float()


def check_episode(ep, pool, ways, shots, queries):
    assert ep.support_x.shape == (ways * shots,) and ep.query_x.shape == (ways * queries,)
    assert torch.equal(ep.support_y, torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(ep.query_y, torch.arange(ways).repeat_interleave(queries))
    support, query = set(ep.support_x.tolist()), set(ep.query_x.tolist())
    assert len(support) == ways * shots and len(query) == ways * queries  # no example twice
    assert not support & query
    starts = torch.tensor(pool.starts + [sum(pool.counts)], dtype=torch.float)
    cls = lambda x: torch.bucketize(x, starts, right=True) - 1  # noqa: E731
    for label in range(ways):  # a label is one original class in support and query
        classes = set(cls(ep.support_x[ep.support_y == label]).tolist()) | set(
            cls(ep.query_x[ep.query_y == label]).tolist()
        )
        assert len(classes) == 1


@FAST
@given(
    st.lists(st.integers(0, 12), max_size=12),
    st.integers(-2, 14),
    st.integers(-2, 8),
    st.integers(-2, 8),
    st.integers(1, 3),
    st.integers(0, 2**31),
)
def test_episode_sampler_shapes_and_disjoint_sets(counts, ways, shots, queries, batch, seed):
    pool = CountPool(counts)
    valid = (
        ways >= 1 and shots >= 1 and queries >= 0 and ways <= len(counts) and shots + queries <= min(counts, default=0)
    )
    try:
        sampler = EpisodeSampler(pool, ways, shots, queries)
    except ValueError as err:
        assert not valid
        assert any(word in err.args[0] for word in ("ways", "shots", "queries", "classes", "class"))
        return
    assert valid
    for ep in sampler.sample_batch(batch, torch.Generator().manual_seed(seed)):
        check_episode(ep, pool, ways, shots, queries)


@FAST
@given(st.integers(-2, 30), st.integers(-2, 30), st.sampled_from(["train", "val", "test"]))
def test_sinusoid_tasks_shapes_or_config_error(shots, queries, subset):
    try:
        data = from_dict({"data": {"name": "sinusoid", "shots": shots, "queries": queries}}).data
    except ConfigError:
        assert shots < 1 or queries < 1
        return
    assert isinstance(data, Sinusoid)
    ep = build_sampler(data, subset).sample(torch.Generator().manual_seed(0))
    assert ep.support_x.shape == (shots, 1) and ep.query_x.shape == (queries, 1)
