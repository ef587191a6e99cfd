"""Conv + ReLU in one oneDNN call (vggkit.kernels.conv_relu) against conv then ReLU, and where it
does not apply."""
import pytest
import torch

from helpers import DTYPES, FORMATS
from vggkit import kernels


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("conv", [dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
                                  dict(in_channels=1, out_channels=4, kernel_size=3, padding=1, bias=False),
                                  dict(in_channels=4, out_channels=6, kernel_size=3, padding=0, stride=2)],
                         ids=["3x3", "one-channel-no-bias", "strided"])
def test_conv_relu_equals_conv_then_relu(layout, precision, conv):
    torch.manual_seed(0)
    conv, relu = torch.nn.Conv2d(**conv), torch.nn.ReLU()
    x = torch.randn(2, conv.in_channels, 9, 8).contiguous(memory_format=FORMATS[layout]).requires_grad_()
    assert not kernels.why_not("conv_relu", [conv, relu], x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        fused, plain = kernels.conv_relu(conv, x), relu(conv(x))
    assert fused.dtype == plain.dtype and fused.shape == plain.shape
    tolerance = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(fused, plain, **tolerance)
    inputs = [t for t in (x, conv.weight, conv.bias) if t is not None]
    grad = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(fused, inputs, grad), torch.autograd.grad(plain, inputs, grad)):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)


def test_conv_relu_is_left_to_pytorch_where_it_cannot_apply():
    conv, relu = torch.nn.Conv2d(2, 3, 3, padding="same"), torch.nn.ReLU()
    x = torch.randn(1, 2, 5, 5)
    assert kernels.why_not("conv_relu", [conv, relu], x)  # padding="same"
    assert not kernels.OPS["conv_relu"].covers([torch.nn.Conv2d(2, 3, 3), torch.nn.Identity(), relu, torch.nn.MaxPool2d(2)], 0)
    hooked = torch.nn.Conv2d(2, 3, 3)
    hooked.register_forward_hook(lambda *a: None)
    assert kernels.why_not("conv_relu", [hooked, relu], x)
