"""Every meta-learner's ``adapt(support_x, support_y)`` refuses a support set it cannot read with a
clear error (not a torch traceback from deep inside): float labels, labels shorter or longer than
the examples, labels that are not a tensor. Run over every meta-learner in the registry."""

import pytest
import torch

import metatl  # noqa: F401  (registers everything)
from metatl.config import from_dict
from metatl.engine.build import learner_from_spec
from metatl.meta.base import GradientMetaLearner, MetaLearner
from metatl.registry import ALGORITHMS

META = sorted(name for name, cls in ALGORITHMS.items() if isinstance(cls, type) and issubclass(cls, MetaLearner))


def small_learner(name):
    model = {"name": "conv4_relation" if name == "relation" else "conv4_stride", "filters": 8}
    cfg = from_dict(
        {
            "algorithm": {"name": name},
            "model": model,
            "data": {"name": "omniglot", "ways": 3, "shots": 2, "image_size": 28},
        }
    )
    spec = {"task_type": "classification", "out_features": 3, "input_spec": {"in_channels": 1, "image_size": 28}}
    torch.manual_seed(0)
    return learner_from_spec(cfg, spec).eval()


def test_the_registry_has_the_meta_learners():
    assert {"maml", "reptile", "protonet", "matching", "relation", "mann", "snail"} <= set(META)


@pytest.mark.parametrize("name", META)
def test_adapt_names_what_is_wrong_with_the_support_labels(name):
    learner = small_learner(name)
    steps = {"steps": 1} if isinstance(learner, GradientMetaLearner) else {}  # one inner step is enough here
    x, y = torch.rand(6, 1, 28, 28), torch.arange(3).repeat(2)
    reference = learner.adapt(x, y, **steps).predict_proba(x)
    # int32 labels are class labels too
    assert torch.allclose(learner.adapt(x, y.int(), **steps).predict_proba(x), reference)
    with pytest.raises(ValueError, match="support_y must hold integer class labels 0..N-1, got dtype torch.float32"):
        learner.adapt(x, y.float())
    with pytest.raises(ValueError, match=r"support_x has 6 example\(s\) but support_y has 5 label\(s\)"):
        learner.adapt(x, y[:5])
    with pytest.raises(ValueError, match=r"support_x has 6 example\(s\) but support_y has 7 label\(s\)"):
        learner.adapt(x, torch.cat([y, y[:1]]))
    with pytest.raises(ValueError, match="support_y must be a tensor, got list"):
        learner.adapt(x, y.tolist())
    with pytest.raises(ValueError, match=r"one class label per example, shape \(n,\)"):
        learner.adapt(x, torch.stack([y, y], 1)[:, :1].expand(6, 2))


def test_regression_targets_must_be_floats():
    from metatl.meta import MAML
    from metatl.nn import mlp

    learner = MAML(mlp(), task_type="regression")
    x = torch.rand(5, 1)
    assert learner.adapt(x, torch.rand(5, 1))(x).shape == (5, 1)
    with pytest.raises(ValueError, match="regression task must hold float targets, got dtype torch.int64"):
        learner.adapt(x, torch.ones(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"support_x has 5 example\(s\) but support_y has 4 label\(s\)"):
        learner.adapt(x, torch.rand(4, 1))
