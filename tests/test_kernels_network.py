"""A whole training step of the network on the fast kernels against the plain network, and the
fused optimizer step against the plain one."""
import copy

import pytest
import torch

from helpers import assert_no_further_off, backward_ops, train_step
from vggkit.config import resolve_config
from vggkit.model import VGG, set_kernels


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_training_step_fused_equals_plain(fused, precision, batch_norm):
    torch.manual_seed(0)
    model = VGG("1x8,2x16", in_channels=1, input_size=16, fc_width=32, num_classes=5, dropout=0.0,
                batch_norm=batch_norm).to(memory_format=torch.channels_last)
    plain, float_model = copy.deepcopy(model), copy.deepcopy(model)
    assert set_kernels(model, "fast") == "fast" and set_kernels(plain, "plain") == "plain"
    set_kernels(float_model, "plain")
    x = torch.randn(32, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (32,))
    loss, grads = train_step(model, x, y, precision)
    loss_plain, grads_plain = train_step(plain, x, y, precision)
    tolerance = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=1e-3)
    # max(relu(x)) = relu(max(x)) exactly; the fused batch norm sums in another order
    torch.testing.assert_close(loss, loss_plain, **tolerance)
    if precision == "bf16" and batch_norm:
        # the first block (ConvBatchNormPoolReLU) rounds its bf16 output once, PyTorch's modules twice:
        # from there on the two differ by more than a rounding, so both are held against float32
        assert_no_further_off(grads, grads_plain, train_step(float_model, x, y, "fp32")[1])
    else:
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_plain[name], **tolerance, msg=name)
    calls = backward_ops(model(x).sum())
    # each block's end is one fused op: the first block [conv, (bn,) ReLU, pool] on the input one
    # ConvBatchNormPoolReLU (test_kernels_conv_bn_pool.py) or ConvPoolReLU (test_kernels_conv_pool.py), the second
    # BatchNormPoolReLU (test_kernels_bn_pool.py) or MaxPoolReLU
    expected = ({"ConvBatchNormPoolReLUBackward": 1, "BatchNormPoolReLUBackward": 1} if batch_norm
                else {"ConvPoolReLUBackward": 1, "MaxPoolReLUBackward": 1})
    assert {name: calls.count(name) for name in expected} == expected and "MaxPool2DWithIndicesBackward0" not in calls
    assert ("ConvReLUBackward" in calls) == (not batch_norm)  # the second block's first conv and its ReLU
    assert calls.count("BatchNormReLUBackward") == (1 if batch_norm else 0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fused_optimizer_step_equals_the_plain_one(optimizer):
    from vggkit.optim import make_optimizer

    torch.manual_seed(0)
    model = VGG("1x4,1x8", in_channels=1, input_size=8, fc_width=8, num_classes=3, batch_norm=True)
    plain = copy.deepcopy(model)
    fast = make_optimizer(resolve_config(overrides={"optimizer": optimizer, "kernels": "fast", "lr": 0.1}), model)
    slow = make_optimizer(resolve_config(overrides={"optimizer": optimizer, "kernels": "plain", "lr": 0.1}), plain)
    assert fast.param_groups[0]["fused"] and not slow.param_groups[0]["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for net, opt in ((model, fast), (plain, slow)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
