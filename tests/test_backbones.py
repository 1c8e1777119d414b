"""Backbone options that must not change results: the channels-last memory layout."""
import pytest
import torch

from metatl.nn.backbones import conv4_pool, conv4_stride


@pytest.mark.parametrize("factory", [conv4_stride, conv4_pool])
@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_channels_last_gives_the_same_outputs_and_gradients(factory, bn_mode):
    torch.manual_seed(0)
    plain = factory(out_features=5, bn_mode=bn_mode, filters=16)
    fast = factory(out_features=5, bn_mode=bn_mode, filters=16, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(12, 1, 28, 28)
    out_plain, out_fast = plain(x), fast(x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        # conv biases before BatchNorm have (near-)zero gradients: compare on the scale of the others
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_maml_batch_tasks_refuses_channels_last_with_the_fix():
    from metatl.meta import MAML

    with pytest.raises(ValueError, match="channels_last=false"):
        MAML(conv4_stride(bn_mode="batch", filters=8, channels_last=True), batch_tasks=True)
    MAML(conv4_stride(bn_mode="batch", filters=8, channels_last=True))  # the per-task loop runs it
