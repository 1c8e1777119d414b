"""metatl.nn.fast.functional_call against torch.func.functional_call."""

import pytest
import torch
from torch import nn

from metatl.nn.backbones import conv4_stride
from metatl.nn.fast import _PLANS, functional_call


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _other_params(model, scale=2.0):
    return {k: p.detach() * scale + 0.1 for k, p in model.named_parameters()}


def test_same_outputs_and_gradients_as_torch_and_the_module_is_restored():
    model = conv4_stride(filters=8)
    originals = {k: p for k, p in model.named_parameters()}
    params = {k: v.requires_grad_() for k, v in _other_params(model, 0.5).items()}
    x = torch.rand(6, 1, 28, 28)
    out = functional_call(model, params, (x,))
    reference = torch.func.functional_call(model, params, (x,), strict=False)
    torch.testing.assert_close(out, reference)
    assert not torch.allclose(out, model(x))  # the given weights were used, not the module's
    grads = torch.autograd.grad(out.square().sum(), list(params.values()))
    expected = torch.autograd.grad(reference.square().sum(), list(params.values()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert all(p is originals[k] for k, p in model.named_parameters())


def test_a_subset_of_the_parameters_and_torch_func_transforms():
    model = _net()
    x = torch.rand(5, 3)
    params = {"2.weight": torch.rand(2, 4)}  # the rest from the module
    torch.testing.assert_close(
        functional_call(model, params, x), torch.func.functional_call(model, params, (x,), strict=False)
    )
    theta = _other_params(model)
    batched = torch.stack([x, 2 * x])
    mine = torch.func.vmap(torch.func.grad(lambda p, xb: functional_call(model, p, (xb,)).sum()), in_dims=(None, 0))(
        theta, batched
    )
    ref = torch.func.vmap(
        torch.func.grad(lambda p, xb: torch.func.functional_call(model, p, (xb,)).sum()), in_dims=(None, 0)
    )(theta, batched)
    for k in theta:
        torch.testing.assert_close(mine[k], ref[k])


def test_a_changed_module_tree_is_seen_at_the_next_call():
    model = _net()
    x = torch.rand(5, 3)
    params = _other_params(model)
    functional_call(model, params, (x,))  # plan made
    model[2] = nn.Linear(4, 2)  # replaced after the plan was made: its weights must be used
    params = _other_params(model)
    torch.testing.assert_close(
        functional_call(model, params, (x,)), torch.func.functional_call(model, params, (x,), strict=False)
    )
    model[0].weight = nn.Parameter(torch.zeros(4, 3))  # a parameter replaced
    partial = {"2.weight": params["2.weight"]}
    torch.testing.assert_close(
        functional_call(model, partial, (x,)), torch.func.functional_call(model, partial, (x,), strict=False)
    )
    assert _PLANS[model].slots["0.weight"][0]["weight"] is model[0].weight


def test_tied_weights_and_unknown_names_go_to_torch():
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight  # one tensor under two names
    x = torch.rand(3, 4)
    params = {"0.weight": torch.rand(4, 4)}  # as named_parameters() lists it: the second name is implied
    torch.testing.assert_close(
        functional_call(tied, params, (x,)), torch.func.functional_call(tied, params, (x,), strict=False)
    )
    assert _PLANS[tied].tied
    # a name that is no parameter or buffer of the model: torch's behaviour (an attribute for the call)
    model = _net()
    x = torch.rand(2, 3)
    params = {**_other_params(model), "extra": torch.ones(1)}
    torch.testing.assert_close(
        functional_call(model, params, (x,)), torch.func.functional_call(model, params, (x,), strict=False)
    )
    assert not hasattr(model, "extra")


class _Counter(nn.Module):
    """A module whose forward pass reassigns a buffer (as some normalisation layers do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        self.seen = self.seen + len(x)
        if len(x) > 3:
            raise ValueError("too many")
        return self.lin(x)


def test_a_reassigned_buffer_is_written_back_and_an_error_restores_the_module():
    model = _Counter()
    original = {k: t for k, t in [*model.named_parameters(), *model.named_buffers()]}
    params = {"seen": torch.tensor(5.0), "lin.weight": torch.eye(2)}
    functional_call(model, params, (torch.rand(2, 2),))
    assert params["seen"].item() == 7.0 and model.seen.item() == 0.0  # as torch.func.functional_call
    with pytest.raises(ValueError, match="too many"):
        functional_call(model, params, (torch.rand(4, 2),))
    assert all(t is original[k] for k, t in [*model.named_parameters(), *model.named_buffers()])
