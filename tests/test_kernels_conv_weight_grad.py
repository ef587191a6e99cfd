"""The 3x3 convolution weight gradient on the AMX matrix units (kernels/conv_weight_grad.cpp) against
PyTorch's float32 convolution backward, and the ConvReLU paths that use it against plain conv2d.
Skipped where the kernels cannot be built or the CPU has no AMX (the plain path is what runs there)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_no_further_off, backward_ops, require_kernels

from vggkit import VGG
from vggkit import kernels
from vggkit.model import set_kernels

CL = torch.channels_last


def on_tiles(x_shape, weight_shape, dtype, stride, padding, dilation, groups) -> bool:
    """Whether the routing runs the weight gradient of such a conv on the AMX tiles."""
    conv = torch.nn.Conv2d(x_shape[1], weight_shape[0], tuple(weight_shape[2:]), stride, padding, dilation, groups)
    return not kernels.why_not("conv_tiled_weight_grad", [conv], torch.empty(x_shape, dtype=dtype))


@pytest.fixture(autouse=True)
def amx():
    require_kernels()
    if not torch.ops.vggkit.conv3x3_weight_grad_available():
        pytest.skip("no AMX on this CPU: convolution weight gradients stay with oneDNN")


def reference(grad, x, out_channels):
    weight = torch.zeros(out_channels, x.shape[1], 3, 3)
    return torch.ops.aten.convolution_backward(grad.float(), x.float(), weight, None, [1, 1], [1, 1], [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


# images whose padded grid is not a whole number of 32-pixel steps or 256-pixel chunks, one block of
# 16 channels (in or out), odd sizes, a batch smaller than the threads
@pytest.mark.parametrize("n,cin,h,w,cout", [(3, 32, 7, 7, 48), (2, 16, 9, 5, 16), (1, 64, 14, 14, 32),
                                            (5, 48, 3, 11, 64), (4, 16, 20, 17, 80)])
def test_weight_grad_equals_the_float32_convolution_backward(n, cin, h, w, cout):
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w).bfloat16().contiguous(memory_format=CL)
    grad = torch.randn(n, cout, h, w).bfloat16().contiguous(memory_format=CL)
    got, bias = torch.ops.vggkit.conv3x3_weight_grad(grad, x)
    assert got.dtype == bias.dtype == torch.float32 and got.shape == (cout, cin, 3, 3) and bias.shape == (cout,)
    # bf16 products are exact in float32: only the order of the float32 sums differs
    torch.testing.assert_close(got, reference(grad, x, cout), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias, grad.double().sum((0, 2, 3)).float(), rtol=1e-5, atol=1e-4)


def test_weight_grad_takes_contiguous_inputs_too():
    torch.manual_seed(1)
    x, grad = torch.randn(2, 16, 6, 6).bfloat16(), torch.randn(2, 16, 6, 6).bfloat16()
    torch.testing.assert_close(torch.ops.vggkit.conv3x3_weight_grad(grad, x)[0], reference(grad, x, 16),
                               rtol=1e-4, atol=1e-4)


def test_weight_grad_refuses_what_it_cannot_compute():
    x = torch.randn(1, 16, 4, 4).bfloat16()
    with pytest.raises(RuntimeError, match="multiples of 16"):
        torch.ops.vggkit.conv3x3_weight_grad(torch.randn(1, 8, 4, 4).bfloat16(), x)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.vggkit.conv3x3_weight_grad(torch.randn(1, 16, 2, 2).bfloat16(), x)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.vggkit.conv3x3_weight_grad(torch.randn(1, 16, 4, 4), x.float())


def test_applies_only_where_it_measured_faster():
    args = ((1, 1), (1, 1), (1, 1), 1)
    assert on_tiles((8, 64, 14, 14), (64, 64, 3, 3), torch.bfloat16, *args)
    assert on_tiles((8, 32, 56, 56), (64, 32, 3, 3), torch.bfloat16, *args)
    assert not on_tiles((8, 64, 14, 14), (64, 64, 3, 3), torch.float32, *args)
    assert not on_tiles((8, 16, 112, 112), (32, 16, 3, 3), torch.bfloat16, *args)  # one block in
    assert not on_tiles((8, 48, 14, 14), (40, 48, 3, 3), torch.bfloat16, *args)  # 40 out
    assert not on_tiles((8, 64, 14, 14), (64, 64, 3, 3), torch.bfloat16, (2, 2), (1, 1), (1, 1), 1)
    assert not on_tiles((8, 64, 14, 14), (64, 64, 1, 1), torch.bfloat16, (1, 1), (0, 0), (1, 1), 1)


@pytest.mark.parametrize("relu", [True, False])
def test_conv_with_the_tiled_weight_grad_equals_conv2d(relu):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    x = torch.randn(4, 64, 7, 7).contiguous(memory_format=CL).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.why_not("conv_tiled_weight_grad", [conv], x)
        fused = kernels.conv_relu(conv, x, relu=relu)
        plain = conv(x)
        plain = torch.relu(plain) if relu else plain
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=2e-2)
    grad = torch.randn_like(plain)
    got = torch.autograd.grad(fused, (x, conv.weight, conv.bias), grad)
    want = torch.autograd.grad(plain, (x, conv.weight, conv.bias), grad)
    for a, b, name in zip(got, want, ("input", "weight", "bias")):
        assert a.dtype == b.dtype, name
        # the weight gradient here is float32 sums rounded once; PyTorch's is rounded to bf16 first
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.slow
def test_a_batch_norm_network_trains_alike_with_the_tiled_weight_grad():
    torch.manual_seed(0)
    model = VGG("1x16,1x32,1x64", in_channels=1, input_size=28, fc_width=32, num_classes=5, dropout=0.0,
                batch_norm=True).to(memory_format=CL)
    plain, float_model = copy.deepcopy(model), copy.deepcopy(model)
    set_kernels(model, "fast"), set_kernels(plain, "plain"), set_kernels(float_model, "plain")
    x, y = torch.randn(32, 1, 28, 28).contiguous(memory_format=CL), torch.randint(0, 5, (32,))
    grads = []
    for net, bf16 in ((model, True), (plain, True), (float_model, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        grads.append(dict(zip([name for name, _ in net.named_parameters()],
                              torch.autograd.grad(loss, list(net.parameters())))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = backward_ops(model(x).sum())
    assert seen.count("ConvReLUBackward") == 1  # the third block's 32 -> 64 conv at 7x7, before its batch norm
    # the gray first block rounds otherwise than PyTorch's modules (test_kernels_conv_bn_pool.py): both
    # networks' bf16 gradients are held against float32
    assert_no_further_off(*grads)


def test_conv_weight_grad_stays_with_onednn_without_amx(monkeypatch):
    from vggkit.kernels import conv_weight_grad

    monkeypatch.setattr(conv_weight_grad, "_amx", lambda: False)  # as on a CPU without AMX (e.g. AMD Zen 5)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    x = torch.randn(2, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.why_not("conv_tiled_weight_grad", [conv], x)  # a conv before batch norm stays nn.Conv2d
        assert not kernels.why_not("conv_relu", [conv, torch.nn.ReLU()], x)
        fused, plain = kernels.conv_relu(conv, x), torch.relu(conv(x))
    grad = torch.randn_like(plain)
    got = torch.autograd.grad(fused, conv.weight, grad)[0]
    torch.testing.assert_close(got, torch.autograd.grad(plain, conv.weight, grad)[0], rtol=1e-2, atol=1e-2)
