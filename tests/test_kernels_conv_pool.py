"""The fused first-block kernel (vggkit.kernels.conv_pool_relu: 3x3 conv -> ReLU -> 2x2 max-pool,
weight and bias gradients only) against PyTorch's conv2d -> relu -> max_pool2d with autograd:
values, window decisions (the code byte), weight and bias gradients, in float32 and bf16 autocast,
NCHW and channels-last, 1 and 3 input channels, with and without bias, odd sizes, ties; where it
applies; the network's dispatch, fused against plain; the fallback without the library."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import backward_ops, require_kernels, train_step

from vggkit import kernels
from vggkit.kernels import build
from vggkit.model import VGG, set_kernels

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PRECISIONS = ("fp32", "bf16")
BLOCKED = 4  # the code of a window the ReLU blocked (max_pool_relu.cpp's)
# (input channels, output channels, bias, batch, height, width): the d2l first layer's 16 outputs,
# odd sizes, several blocks of 16 outputs with a remainder, fewer outputs than one block
CASES = {"gray-16": (1, 16, True, 4, 18, 18), "rgb-odd": (3, 20, False, 3, 11, 13),
         "gray-8-odd-rows": (1, 8, True, 2, 7, 6), "rgb-32": (3, 32, True, 2, 10, 12)}


def takes(conv, x) -> bool:
    """Whether the kernels can take relu(max_pool2d(conv(x))), forward alone or with autograd (speed aside)."""
    return not kernels.why_not("conv_pool_relu", [conv], x, tuned=False)


def fusable(conv, x) -> bool:
    """As takes, with the autograd function: the weight needs a gradient, autograd records."""
    return takes(conv, x) and conv.weight.requires_grad and torch.is_grad_enabled()


@pytest.fixture(scope="module")
def fused():
    """The C++ kernels, built (or loaded from the cache) once for this module."""
    require_kernels()

    def op(conv, x):
        """The C++ forward itself: the output and the codes."""
        bias = None if conv.bias is None else conv.bias.detach()
        return torch.ops.vggkit.conv_pool_relu(x, conv.weight.detach(), bias)
    return op


def make_conv(cin, cout, bias=True, layout="nchw", integer=False, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    if integer:  # small integers: every sum exact in any order, many ties
        with torch.no_grad():
            conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape))
            if bias:
                conv.bias.copy_(torch.randint(-3, 4, (cout,)))
    return conv.to(memory_format=FORMATS[layout])


def make_input(n, cin, h, w, layout="nchw", integer=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, cin, h, w), generator=g).float() if integer else torch.randn(n, cin, h, w, generator=g)
    return x.contiguous(memory_format=FORMATS[layout])


def autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def plain(conv, x):
    return torch.relu(F.max_pool2d(conv(x), 2, 2))


def reference_codes(conv_out):
    """max_pool2d's choice in each window (0-3, row-major), or BLOCKED where the ReLU stops it."""
    pooled, index = F.max_pool2d(conv_out.float(), 2, 2, return_indices=True)
    width = conv_out.shape[-1]
    oy = torch.arange(pooled.shape[2]).view(-1, 1)
    ox = torch.arange(pooled.shape[3])
    code = (index // width - 2 * oy) * 2 + (index % width - 2 * ox)
    code[pooled <= 0] = BLOCKED
    return code.to(torch.uint8)


def ours_and_plain(conv, x, precision, grad_seed=2):
    """(output, weight gradient, bias gradient) of the fused function and of PyTorch's ops."""
    with autocast(precision):
        y, y_ref = kernels.conv_pool_relu(conv, x), plain(conv, x)
    assert type(y.grad_fn).__name__ == "ConvPoolReLUBackward"
    g = torch.randint(-2, 3, y_ref.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y_ref.dtype)
    params = [p for p in (conv.weight, conv.bias) if p is not None]
    ours, theirs = torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)
    return (y, *ours), (y_ref, *theirs)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES)
def test_integer_data_gives_pytorchs_values_decisions_and_gradients(fused, layout, precision, case):
    """Small integers: the convolution is exact in either dtype and order, so values and window
    decisions (ties: the first max) must be PyTorch's exactly; so must the float32 gradients."""
    cin, cout, bias, n, h, w = CASES[case]
    conv, x = make_conv(cin, cout, bias, layout, integer=True), make_input(n, cin, h, w, layout, integer=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    y, code = fused(conv, x.to(dtype))
    with autocast(precision):
        conv_out = conv(x)
    assert torch.equal(code, reference_codes(conv_out))
    assert (code == BLOCKED).any() and (code < BLOCKED).any()
    ours, theirs = ours_and_plain(conv, x, precision)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(y, theirs[0])
    assert ours[0].dtype == theirs[0].dtype and ours[0].stride() == theirs[0].stride()  # dtype and layout
    for a, b in zip(ours[1:], theirs[1:]):
        assert a.dtype == b.dtype == torch.float32
        if precision == "fp32":
            assert torch.equal(a, b)
        else:  # PyTorch's bf16 convolution rounds its weight gradient to bf16; ours is exact
            torch.testing.assert_close(a, b, rtol=2**-8, atol=0)


def test_any_strides_and_an_empty_batch(fused):
    """A strided input and a broadcast output gradient (stride 0), as PyTorch's ops take them."""
    conv = make_conv(3, 16, integer=True)
    x = make_input(2, 3, 9, 22, "nhwc", integer=True)[:, :, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    y, y_ref = kernels.conv_pool_relu(conv, x), plain(conv, x)
    assert torch.equal(y, y_ref)
    params = [conv.weight, conv.bias]
    grad = torch.ones(()).expand_as(y_ref)
    for a, b in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(y_ref, params, grad)):
        assert torch.equal(a, b)
    empty = kernels.conv_pool_relu(conv, make_input(0, 3, 8, 8))
    assert empty.shape == (0, 16, 4, 4)
    grads = torch.autograd.grad(empty, params, torch.ones_like(empty))
    assert not any(g.any() for g in grads)


def test_a_constant_image_ties_to_the_first_position(fused):
    """All four values of an inner window equal: max_pool2d's first max, position 0."""
    conv = make_conv(1, 16, integer=True)
    with torch.no_grad():
        conv.weight.abs_().add_(1)  # positive: the inner windows' values are positive, not blocked
    x = torch.full((2, 1, 12, 12), 2.0)
    y, code = fused(conv, x)
    assert (code[:, :, 1:-1, 1:-1] == 0).all()
    assert torch.equal(code, reference_codes(conv(x))) and torch.equal(y, plain(conv, x))


@pytest.mark.slow
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", ["gray-16", "rgb-odd"])
def test_random_data_within_rounding_of_pytorch(fused, layout, precision, case):
    """Continuous data at a batch of many backward chunks: values within one rounding, the same
    decisions wherever the window's values are apart by more than rounding, gradients close."""
    cin, cout, bias, _, h, w = CASES[case]
    conv, x = make_conv(cin, cout, bias, layout), make_input(24, cin, h + 9, w + 9, layout)
    bf16 = precision == "bf16"
    ours, theirs = ours_and_plain(conv, x, precision)
    rtol, atol = (2**-7, 1e-5) if bf16 else (1e-5, 1e-5)
    torch.testing.assert_close(ours[0].float(), theirs[0].float(), rtol=rtol, atol=atol)
    with autocast(precision):
        conv_out = conv(x).float()
    _, code = fused(conv, x.to(theirs[0].dtype))
    apart = decided(conv_out, 2 * rtol, 2 * atol)
    assert apart.float().mean() > 0.8
    assert torch.equal(code[apart], reference_codes(conv_out)[apart])
    grad_tolerance = 2e-2 if bf16 else 1e-4
    for a, b in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(a, b, rtol=grad_tolerance, atol=grad_tolerance * b.abs().max().item())


def decided(conv_out, rtol, atol):
    """The windows whose max stands apart from the other three values and from 0 by more than rounding."""
    n, c, h, w = conv_out.shape
    windows = conv_out[:, :, :h // 2 * 2, :w // 2 * 2].unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
    top2 = windows.topk(2, dim=-1).values
    margin = atol + rtol * top2[..., 0].abs()
    return ((top2[..., 0] - top2[..., 1]) > margin) & (top2[..., 0].abs() > margin)


def test_weight_gradient_does_not_depend_on_the_thread_count(fused):
    conv, x = make_conv(3, 20), make_input(32, 3, 20, 20)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = kernels.conv_pool_relu(conv, x)
            grads.append(torch.autograd.grad(y, [conv.weight, conv.bias], torch.ones_like(y)))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_bfloat16_weights_without_autocast(fused):
    conv, x = make_conv(1, 16, integer=True).bfloat16(), make_input(2, 1, 8, 8, integer=True).bfloat16()
    assert fusable(conv, x)
    ours, theirs = ours_and_plain(conv, x, "fp32")
    assert ours[0].dtype == ours[1].dtype == ours[2].dtype == torch.bfloat16
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-8, atol=0)


def test_fuses_only_a_first_layer_it_can_compute(fused):
    conv, x = make_conv(3, 8), make_input(2, 3, 8, 8)
    assert fusable(conv, x)
    assert not fusable(conv, x.clone().requires_grad_())  # not a first layer
    for change in (dict(stride=2), dict(padding=2), dict(dilation=2), dict(kernel_size=5, padding=2),
                   dict(padding_mode="reflect"), dict(padding="same"), dict(in_channels=6)):
        args = {**dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), **change}
        other = nn.Conv2d(**args)
        assert not fusable(other, make_input(2, args["in_channels"], 8, 8)), change
    frozen = make_conv(3, 8).requires_grad_(False)
    assert not fusable(frozen, x) and takes(frozen, x)
    hooked = make_conv(3, 8)
    hooked.register_forward_hook(lambda *a: None)
    assert not fusable(hooked, x)
    assert not fusable(conv, x.double()) and not fusable(conv, x.half())
    assert not fusable(conv, x.bfloat16())  # float32 weights, no autocast
    assert not fusable(conv, make_input(2, 3, 1, 8))  # no window: PyTorch's error
    with torch.no_grad():  # inference: the forward alone
        assert not fusable(conv, x) and takes(conv, x)
        torch.testing.assert_close(kernels.conv_pool_relu(conv, x), plain(conv, x), rtol=1e-5, atol=1e-6)
    for change in (dict(stride=2), dict(in_channels=6)):  # what it cannot compute, in inference too
        args = {**dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), **change}
        assert not takes(nn.Conv2d(**args), make_input(2, args["in_channels"], 8, 8))


def test_a_hook_on_the_first_conv_sees_its_full_output(fused):
    model = VGG("1x8,1x16", in_channels=1, input_size=16, fc_width=16, num_classes=3, batch_norm=False)
    set_kernels(model, "fast")
    seen = []
    model.features[0][0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert seen == [(2, 8, 16, 16)]


# ---------------------------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_network_fused_equals_plain(fused, layout, precision):
    torch.manual_seed(0)
    model = VGG("1x8,1x16", in_channels=1, input_size=32, fc_width=32, num_classes=5, dropout=0.0,
                batch_norm=False).to(memory_format=FORMATS[layout])
    plain_model = copy.deepcopy(model)
    assert set_kernels(model, "fast") == "fast" and set_kernels(plain_model, "plain") == "plain"
    x = make_input(16, 1, 32, 32, layout)
    y = torch.randint(0, 5, (16,))
    loss, grads = train_step(model, x, y, precision)
    loss_plain, grads_plain = train_step(plain_model, x, y, precision)
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    torch.testing.assert_close(loss, loss_plain, rtol=tolerance, atol=0)
    for name, grad in grads.items():
        reference = grads_plain[name]
        assert ((grad - reference).norm() / reference.norm()).item() < tolerance, name
    with autocast(precision):
        calls = backward_ops(model(x).sum())
    assert calls.count("ConvPoolReLUBackward") == 1 and calls.count("MaxPoolReLUBackward") == 1
    assert "MaxPool2DWithIndicesBackward0" not in calls


def test_without_the_library_the_network_still_trains(monkeypatch):
    """The library switched off: nothing fuses, the fused mode's network computes PyTorch's step."""
    monkeypatch.setenv(build.SWITCH, "plain")
    monkeypatch.setattr(build, "LIBRARY", build.KernelLibrary())
    monkeypatch.setattr(build, "_noted", set())
    conv, x = make_conv(1, 8), make_input(4, 1, 16, 16)
    assert not fusable(conv, x)
    assert torch.equal(kernels.conv_pool_relu(conv, x), plain(conv, x))
    torch.manual_seed(0)
    model = VGG("1x8,1x16", in_channels=1, input_size=16, fc_width=16, num_classes=3, dropout=0.0, batch_norm=False)
    plain_model = copy.deepcopy(model)
    for block in model.features:
        block.kernels = "fused"  # as if set before the library was found missing
    set_kernels(plain_model, "plain")
    y = torch.randint(0, 3, (4,))
    loss, grads = train_step(model, x, y, "fp32")
    loss_plain, grads_plain = train_step(plain_model, x, y, "fp32")
    torch.testing.assert_close(loss, loss_plain)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_plain[name], msg=name)
    assert "ConvPoolReLUBackward" not in backward_ops(model(x).sum())


def test_the_network_fuses_gray_first_layers_only(fused):
    """An RGB first layer keeps oneDNN's convolution and the pool kernel: the fused forward measured
    slower there (kernels.tuning.FASTER_IN_CHANNELS)."""
    for channels, expected in ((1, 1), (3, 0)):
        model = VGG("1x8,1x16", in_channels=channels, input_size=16, fc_width=16, num_classes=3, batch_norm=False)
        set_kernels(model, "fast")
        calls = backward_ops(model(make_input(2, channels, 16, 16)).sum())
        assert calls.count("ConvPoolReLUBackward") == expected
        assert calls.count("MaxPoolReLUBackward") == 2 - expected


@pytest.mark.parametrize("precision", PRECISIONS)
def test_network_inference_fused_equals_plain(fused, precision):
    """Inference (grad mode off): the gray first block's forward kernel and the pool kernel's forward."""
    torch.manual_seed(0)
    model = VGG("1x8,2x16", in_channels=1, input_size=32, fc_width=32, num_classes=5, batch_norm=False).eval()
    plain_model = copy.deepcopy(model)
    set_kernels(model, "fast"), set_kernels(plain_model, "plain")
    x = make_input(4, 1, 32, 32, "nhwc")
    with torch.no_grad(), autocast(precision):
        ours, theirs = model(x).float(), plain_model(x).float()
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert ((ours - theirs).norm() / theirs.norm()).item() < tolerance
