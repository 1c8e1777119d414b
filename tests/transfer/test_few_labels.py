"""A fixed number of revealed target labels per class, and fine-tuning from a checkpoint whose head
has other classes (or none): the starting points of few-label transfer."""

import pytest
import torch

from metatl.config import ConfigError, from_dict
from metatl.data.digits import labelled_per_class
from metatl.engine import checkpoint as ckpt_io
from metatl.nn.backbones import conv4_stride
from metatl.registry import ALGORITHMS


def test_labelled_per_class_picks_exactly_k_of_each_class_seeded():
    y = torch.arange(100) % 10
    rows = labelled_per_class(y, 3, seed=0)
    assert torch.equal(torch.bincount(y[rows], minlength=10), torch.full((10,), 3))
    assert torch.equal(rows, labelled_per_class(y, 3, seed=0))
    assert not torch.equal(rows, labelled_per_class(y, 3, seed=1))
    with pytest.raises(ValueError, match="max_target"):
        labelled_per_class(y, 11, seed=0)


def test_per_class_and_fraction_are_exclusive():
    data = {"name": "mnist_usps", "target_labels_per_class": 5, "target_labels_fraction": 0.01}
    with pytest.raises(ConfigError, match="set one of them"):
        from_dict({"data": data})
    with pytest.raises(ConfigError, match="target_labels_per_class"):
        from_dict({"data": {"name": "mnist_usps", "target_labels_per_class": 0}})
    assert from_dict({"data": {"name": "mnist_usps", "target_labels_per_class": 5}}).data.target_labels_per_class == 5


@pytest.mark.parametrize("source_head", [5, 0])  # a 5-way MAML head, and a headless ProtoNet backbone
def test_finetune_with_a_new_head_loads_every_other_weight(tmp_path, source_head):
    torch.manual_seed(0)
    source = conv4_stride(out_features=source_head, filters=8)
    path = tmp_path / "source.pt"
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    ckpt_io.save_atomic({"learner": state, "config": {}}, path)
    finetune = ALGORITHMS.get("finetune")
    learner = finetune(conv4_stride(out_features=10, filters=8), init_checkpoint=str(path), reset_head=True)
    got = learner.model.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(got[name], value), name
    assert got["head.weight"].shape == (10, 8)
    with pytest.raises(ValueError, match="does not fit"):  # keeping the checkpoint's head cannot work
        finetune(conv4_stride(out_features=10, filters=8), init_checkpoint=str(path))
