"""The fused max-pool + ReLU kernel (vggkit.kernels.pool_relu) against PyTorch's relu(max_pool2d(x, 2, 2)):
forward equal, gradients equal, in float32 and bfloat16, NCHW and channels-last, odd sizes, ties,
negative-only windows and NaN; where it applies; the kernels setting per device. The C++ library is
built once per session (a minute the first time on a machine, then cached); without a compiler these
tests are skipped."""
import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, FORMATS
from vggkit import kernels
from vggkit.config import resolve_config
from vggkit.errors import VggkitError
from vggkit.runtime import block_kernels


NAN = float("nan")


def takes(x) -> bool:
    """Whether the pool kernel takes x (forward alone or with autograd)."""
    return not kernels.why_not("max_pool_relu", (), x)


def fusable(x) -> bool:
    """As takes, with autograd recording x's gradient."""
    return takes(x) and x.requires_grad and torch.is_grad_enabled()


def reference(x):
    return torch.relu(F.max_pool2d(x, 2, 2))


def awkward_input(shape, dtype, memory_format, seed=0):
    """Small integers (many ties, zeros, negative-only windows), a few NaN, an all -inf window."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 3, shape, generator=g).to(dtype)
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:5]] = NAN
    x[0, 0, :2, :2] = -float("inf")
    x[0, -1, :2, :2] = torch.tensor([[1.0, NAN], [2.0, NAN]])  # the last NaN of a window takes the gradient
    return x.contiguous(memory_format=memory_format)


def forward_and_grads(fn, x, grad):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("shape", [(2, 16, 8, 10), (3, 5, 7, 9), (1, 32, 3, 2)], ids=["even", "odd", "tiny"])
def test_forward_and_gradients_equal_pytorchs(fused, layout, precision, shape):
    x = awkward_input(shape, DTYPES[precision], FORMATS[layout])
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(x.dtype)
    y, gx = forward_and_grads(fused, x, grad)
    y_ref, gx_ref = forward_and_grads(reference, x, grad)
    assert_same(y, y_ref)
    assert_same(gx, gx_ref)  # each input gradient is one output gradient or 0: no rounding, even in bf16
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=FORMATS[layout])
    assert gx.is_contiguous(memory_format=FORMATS[layout])
    if shape[2] % 2:
        assert not gx[:, :, -1].any()  # the row MaxPool2d drops gets no gradient


def test_gradient_of_a_non_contiguous_output_gradient(fused):
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 3, 8).permute(0, 3, 1, 2)  # neither layout's strides match x's
    assert_same(forward_and_grads(fused, x, grad)[1], forward_and_grads(reference, x, grad)[1])


def test_gradcheck_in_float64(fused):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)  # continuous: no ties
    assert torch.autograd.gradcheck(fused, (x,))
    x_nhwc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fused, (x_nhwc,))


def test_empty_output_gives_a_zero_gradient(fused):
    x = torch.randn(2, 4, 1, 5, requires_grad=True)
    y = fused(x)
    y.sum().backward()
    assert y.shape == (2, 4, 0, 2) and x.grad.shape == x.shape and not x.grad.any()


def test_max_pool_relu_fuses_only_where_autograd_runs_on_the_cpu(fused):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    assert type(kernels.max_pool_relu(x).grad_fn).__name__ == "MaxPoolReLUBackward"
    with torch.no_grad():  # inference: the kernel's forward alone, PyTorch's values to the bit
        assert_same(kernels.max_pool_relu(x), reference(x))
        assert takes(x) and not fusable(x)
    assert not fusable(x.detach()) and not fusable(x.half()) and not takes(x.half())
    assert not fusable(torch.randn(4, 6, 6, requires_grad=True))  # 3-D: PyTorch's ops
    assert not fusable(torch.randn(2, 4, 6, 6, device="meta", requires_grad=True))


def test_kernels_setting_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert block_kernels("auto", cpu) == block_kernels("fast", cpu) == "fast"
    assert block_kernels("auto", cuda) == block_kernels("fast", cuda) == "reordered"
    assert block_kernels("plain", cpu) == block_kernels("plain", cuda) == "plain"
    with pytest.raises(VggkitError, match="kernels must be one of fast, plain, auto"):
        block_kernels("turbo", cpu)
    assert resolve_config().kernels == "fast" and resolve_config(overrides={"kernels": "auto"}).kernels == "auto"
    with pytest.raises(VggkitError, match="kernels must be one of fast, plain, auto, got 'turbo'"):
        resolve_config(overrides={"kernels": "turbo"})
