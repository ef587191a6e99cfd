"""The fused batch norm + 2x2 max-pool + ReLU (vggkit.kernels.batch_norm_pool_relu), the end of a
VGG block with batch norm: forward output, codes and statistics bit-identical to the two kernels it
replaces (batch_norm_relu without ReLU, then max_pool_relu), gradients within rounding of theirs
and of PyTorch's BatchNorm2d -> ReLU -> max_pool2d; NCHW and channels-last, float32 and bfloat16,
odd sizes, ties, negative weights, NaN, thread counts; what stays with PyTorch; the VGG block's
dispatch; the build hash over included headers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FORMATS, backward_ops, train_step
from test_kernels_bn_relu import AGAINST_PYTORCH, batch_norm, bf16_input, close_to_scale, run, sample

from vggkit import kernels
from vggkit.kernels import build
from vggkit.model import VGG, set_kernels

SHAPES = {"odd": (4, 17, 9, 7), "even": (4, 32, 6, 8), "one-channel": (2, 1, 5, 5), "smallest": (3, 16, 2, 3),
          "several-chunks": (8, 17, 32, 32)}
PRECISIONS = ["fp32", "bf16"]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def fusable(x, bn) -> bool:
    """Whether the routing takes relu(max_pool2d(bn(x))) to the one kernel."""
    return not kernels.why_not("batch_norm_pool_relu", [bn], x)


def bits(t):
    return t.view(BITS[t.dtype])


def op_pair(x, bn):
    """The two kernels the fused one replaces, called as ops: (pooled, code, mean, invstd, running mean, var)."""
    running = bn.running_mean.clone(), bn.running_var.clone()
    y, mean, invstd = torch.ops.vggkit.batch_norm_relu(x, bn.weight.detach(), bn.bias.detach(), *running, 0.1,
                                                       bn.eps, False)
    return (*torch.ops.vggkit.max_pool_relu(y), mean, invstd, *running)


def op_fused(x, bn):
    running = bn.running_mean.clone(), bn.running_var.clone()
    return (*torch.ops.vggkit.batch_norm_pool_relu(x, bn.weight.detach(), bn.bias.detach(), *running, 0.1, bn.eps),
            *running)


def assert_bit_identical(x, bn):
    pooled, code, *stats = op_fused(x, bn)
    pooled_ref, code_ref, *stats_ref = op_pair(x, bn)
    assert pooled.dtype == x.dtype and code.dtype == torch.uint8 and pooled.shape == code.shape == pooled_ref.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    assert pooled.is_contiguous(memory_format=layout) and code.is_contiguous(memory_format=layout)
    assert torch.equal(bits(pooled), bits(pooled_ref)) and torch.equal(code, code_ref)
    for name, one, two in zip(("mean", "invstd", "running_mean", "running_var"), stats, stats_ref):
        assert torch.equal(bits(one), bits(two)), name  # NaN too
    return pooled, code


def pooled_grad(x, seed=1):
    n, c, h, w = x.shape
    return torch.randn(n, c, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


def fused_pair(x, bn):
    """Today's fused path without the new kernel: batch norm (no ReLU), then pool + ReLU."""
    return kernels.max_pool_relu(kernels.batch_norm_relu(x, bn, relu=False))


def reference(x, bn):
    """PyTorch's modules in the standard layout's order."""
    return F.max_pool2d(torch.relu(bn(x)), 2, 2)


# ---------------------------------------------------------------------------------------------
# Against the two kernels it replaces


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_is_the_two_kernels_to_the_bit(fused, layout, precision, shape):
    with torch.no_grad():
        assert_bit_identical(bf16_input(sample(shape, layout), precision), batch_norm(shape[1]))


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_nan_and_blocked_windows_follow_max_pool_relu(fused, layout, precision):
    """Small integers (ties in most windows, windows all <= 0 after the affine map), a channel with a
    NaN (its statistics and so all its outputs NaN: the last NaN of each window takes the gradient)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (4, 6, 7, 6), generator=g).float()
    x[1, 2, 3, 3] = float("nan")
    x = bf16_input(x.contiguous(memory_format=FORMATS[layout]), precision)
    with torch.no_grad():
        pooled, code = assert_bit_identical(x, batch_norm(6))
    assert (code == 4).any() and (code == 0).any() and (code[:, 2] == 3).all() and pooled[:, 2].isnan().all()


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_constant_input_ties_at_the_first_position(fused, layout, precision):
    x = bf16_input(torch.full((3, 5, 4, 6), 2.5).contiguous(memory_format=FORMATS[layout]), precision)
    bn = batch_norm(5)
    with torch.no_grad():
        _, code = assert_bit_identical(x, bn)
    # variance 0: every output is the bias (to a rounding); the first position wins, or the ReLU blocks
    expected = torch.where(bn.bias > 0, 0, 4).to(torch.uint8).view(1, 5, 1, 1).expand_as(code)
    assert torch.equal(code, expected)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ["odd", "even", "smallest"])
def test_gradients_equal_the_two_kernels_to_rounding(fused, layout, precision, shape):
    shape = SHAPES[shape]
    x = bf16_input(sample(shape, layout), precision)
    grad = pooled_grad(x)
    bn, bn_pair = batch_norm(shape[1]), batch_norm(shape[1])
    y, gx, gp = run(kernels.batch_norm_pool_relu, bn, x, grad, precision)
    y_pair, gx_pair, gp_pair = run(fused_pair, bn_pair, x, grad, precision)
    out = kernels.batch_norm_pool_relu(x.detach().requires_grad_(), batch_norm(shape[1]))
    assert type(out.grad_fn).__name__ == "BatchNormPoolReLUBackward"
    assert torch.equal(bits(y), bits(y_pair))
    assert gx.dtype == x.dtype and gx.is_contiguous(memory_format=FORMATS[layout])
    torch.testing.assert_close(bn.state_dict(), bn_pair.state_dict(), rtol=0, atol=0)  # num_batches_tracked too
    close_to_scale(gx, gx_pair, 2**-7 if precision == "bf16" else 1e-5)  # one bf16 rounding at most
    for name, g in gp.items():
        close_to_scale(g, gp_pair[name], 1e-5)
    if shape[3] % 2:  # the column no window reaches still has its batch-norm gradient
        assert gx[:, :, :, -1].abs().sum() > 0
        close_to_scale(gx[:, :, :, -1], gx_pair[:, :, :, -1], 2**-7 if precision == "bf16" else 1e-5)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ["odd", "even", "several-chunks"])
def test_forward_statistics_and_gradients_equal_pytorchs(fused, layout, precision, shape):
    shape = SHAPES[shape]
    x = bf16_input(sample(shape, layout), precision)
    grad = pooled_grad(x)
    bn, bn_ref = batch_norm(shape[1]), batch_norm(shape[1])
    y, gx, gp = run(kernels.batch_norm_pool_relu, bn, x, grad, precision)
    y_ref, gx_ref, gp_ref = run(reference, bn_ref, x, grad, precision)
    tolerance = AGAINST_PYTORCH[precision]
    torch.testing.assert_close(y, y_ref, **tolerance["y"])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn_ref, name), rtol=tolerance["stats"], atol=1e-7,
                                   msg=name)
    close_to_scale(gx, gx_ref, tolerance["x"])
    for name, g in gp.items():
        close_to_scale(g, gp_ref[name], tolerance["params"])


@pytest.mark.parametrize("layout", FORMATS)
def test_a_negative_weight_takes_the_window_at_the_min_of_x(fused, layout):
    x = sample((4, 6, 8, 6), layout)
    bn = batch_norm(6)
    with torch.no_grad():
        bn.weight.copy_(-torch.linspace(0.5, 2.0, 6))
        bn.bias.fill_(5.0)  # no window blocked
    grad = pooled_grad(x)
    bn_ref = copy.deepcopy(bn)
    y, gx, _ = run(kernels.batch_norm_pool_relu, bn, x, grad, "fp32")
    y_ref, gx_ref, _ = run(reference, bn_ref, x, grad, "fp32")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        _, code = assert_bit_identical(x, bn)
    windows = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(*code.shape, 4)
    assert torch.equal(code.long(), windows.argmin(-1))  # the max of the affine values, at the min of x


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("channels", [17, 32])
def test_results_do_not_depend_on_the_number_of_threads(fused, layout, channels):
    x = sample((8, channels, 32, 32), layout).to(torch.bfloat16)
    grad = pooled_grad(x).to(torch.bfloat16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            bn = batch_norm(channels)
            y, gx, gp = run(kernels.batch_norm_pool_relu, bn, x, grad, "fp32")
            results.append((y, gx, gp["weight"], gp["bias"], bn.running_var))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("options", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)],
                         ids=["no-affine", "no-running-stats", "cumulative-average"])
def test_batch_norm_options_follow_the_two_kernels(fused, options):
    x = sample((4, 6, 5, 5), "nhwc")
    grad = pooled_grad(x)
    bn, bn_pair = batch_norm(6, **options), batch_norm(6, **options)
    for _ in range(2):  # momentum=None: the second batch weighs 1/2
        y, gx, gp = run(kernels.batch_norm_pool_relu, bn, x, grad, "fp32")
        y_pair, gx_pair, gp_pair = run(fused_pair, bn_pair, x, grad, "fp32")
    assert torch.equal(y, y_pair) and gp.keys() == gp_pair.keys()
    torch.testing.assert_close(gx, gx_pair, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.state_dict(), bn_pair.state_dict(), rtol=0, atol=0)


def test_output_gradient_of_another_layout(fused):
    x = sample((2, 8, 6, 6), "nhwc")
    grad = torch.randn(2, 3, 3, 8).permute(0, 3, 1, 2)  # neither layout's strides
    gx = run(kernels.batch_norm_pool_relu, batch_norm(8), x, grad, "fp32")[1]
    torch.testing.assert_close(gx, run(fused_pair, batch_norm(8), x, grad, "fp32")[1], rtol=1e-5, atol=1e-6)


def test_what_stays_with_the_two_kernels_or_pytorch(fused):
    x = sample((2, 4, 6, 5), "nhwc").requires_grad_()
    assert fusable(x, batch_norm(4))
    narrow = sample((2, 4, 6, 1), "nhwc").requires_grad_()  # nothing to pool: an empty output
    assert not fusable(narrow, batch_norm(4))
    assert kernels.batch_norm_pool_relu(narrow, batch_norm(4)).shape == (2, 4, 3, 0)
    assert not fusable(x, batch_norm(4).eval())
    assert not fusable(x.detach(), batch_norm(4))
    hooked = batch_norm(4)
    hooked.register_forward_hook(lambda *args: None)
    assert not fusable(x, hooked)
    eval_bn = batch_norm(4).eval()
    torch.testing.assert_close(kernels.batch_norm_pool_relu(x, eval_bn), reference(x, eval_bn), rtol=0, atol=0)
    with torch.no_grad():
        bn, bn_ref = batch_norm(4), batch_norm(4)
        torch.testing.assert_close(kernels.batch_norm_pool_relu(x, bn), reference(x, bn_ref), rtol=0, atol=0)
        torch.testing.assert_close(bn.state_dict(), bn_ref.state_dict(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="height and width of at least 2"):
        torch.ops.vggkit.batch_norm_pool_relu(narrow.detach(), None, None, None, None, 0.1, 1e-5)


# ---------------------------------------------------------------------------------------------
# The VGG block


def small_vgg():
    """RGB: a gray first block would be one ConvBatchNormPoolReLU (test_kernels_conv_bn_pool.py)."""
    torch.manual_seed(0)
    return VGG("1x8,2x16", batch_norm=True, in_channels=3, input_size=12, fc_width=32, num_classes=5, dropout=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_vgg_blocks_end_in_the_fused_kernel_and_train_as_plain(fused, layout, precision):
    model = small_vgg().to(memory_format=FORMATS[layout])
    plain = copy.deepcopy(model)
    assert set_kernels(model, "fast") == "fast" and set_kernels(plain, "plain") == "plain"
    x = torch.randn(8, 3, 12, 12).contiguous(memory_format=FORMATS[layout])
    y = torch.randint(0, 5, (8,))
    loss, grads = train_step(model, x, y, precision)
    loss_plain, grads_plain = train_step(plain, x, y, precision)
    tolerance = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss, loss_plain, **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_plain[name], **tolerance, msg=name)
    torch.testing.assert_close(model.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)
    calls = backward_ops(model(x).sum())
    assert calls.count("BatchNormPoolReLUBackward") == 2 and calls.count("BatchNormReLUBackward") == 1
    assert "MaxPoolReLUBackward" not in calls and not [c for c in calls if "NativeBatchNorm" in c]


def test_a_hook_on_the_last_batch_norm_keeps_the_two_kernels(fused):
    model = small_vgg()
    set_kernels(model, "fast")
    seen = []
    model.features[0][1].register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    calls = backward_ops(model(torch.randn(2, 3, 12, 12)).sum())
    assert seen == [(2, 8, 12, 12)]  # the hook sees the batch norm's full-size output
    assert calls.count("BatchNormPoolReLUBackward") == 1 and calls.count("MaxPoolReLUBackward") == 1


# ---------------------------------------------------------------------------------------------
# The build


def test_build_hash_covers_the_headers_a_source_includes(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    header, source = tmp_path / "common.h", tmp_path / "op.cpp"
    header.write_text("// one\n")
    source.write_text('#include <vector>\n#include "common.h"\n')
    before = build.KernelLibrary(source).build_dir()
    header.write_text("// two\n")
    assert build.KernelLibrary(source).build_dir() != before
    shipped = build.source_texts(build.SOURCES)
    common = build.SOURCES[0].with_name("batch_norm_common.h").read_bytes()
    assert shipped.count(common) == 1  # once, though two sources include it
