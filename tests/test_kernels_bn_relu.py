"""The fused batch-norm (+ReLU) kernels (vggkit.kernels.batch_norm_relu) against PyTorch's
BatchNorm2d in training mode followed by ReLU: outputs, running statistics and gradients, in
float32 and under bf16 autocast, NCHW and channels-last, odd shapes; the cases left to PyTorch;
the fallback where the kernels cannot be had; the fast preset's network trained a few steps fused
and plain. The `fused` fixture (conftest.py) builds the library once, or skips."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import backward_ops
from helpers import FORMATS
from torch import nn

from vggkit import kernels
from vggkit.config import resolve_config
from vggkit.kernels import build
from vggkit.model import set_kernels
from vggkit.optim import make_optimizer

SHAPES = {"odd": (4, 17, 9, 7), "one-channel": (2, 1, 5, 5), "rgb": (3, 3, 4, 4), "one-image": (1, 16, 3, 5),
          "whole-blocks": (4, 32, 6, 5), "several-chunks": (8, 17, 32, 32)}
# Against PyTorch, whose own channels-last sums are off by up to ~1e-5 (float32 statistics) and ~3e-3
# (bf16: the weight gradient) of the exact values: see test_results_are_roundings_of_the_exact_ones.
AGAINST_PYTORCH = {
    "fp32": dict(y=dict(rtol=1e-5, atol=1e-5), x=1e-5, stats=5e-5, params=1e-4),
    "bf16": dict(y=dict(rtol=2**-7, atol=1e-5), x=2**-7, stats=5e-5, params=5e-3),
}


def fusable(x, bn) -> bool:
    """Whether the routing takes bn(x) to the fused batch-norm kernel."""
    return not kernels.why_not("batch_norm_relu", [bn], x)


def batch_norm(channels, seed=0, **options):
    """A BatchNorm2d in training mode with weights and running statistics away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, **options)
    with torch.no_grad():
        for t, low, high in ((bn.weight, -1.0, 2.0), (bn.bias, -1.0, 1.0), (bn.running_mean, -0.5, 0.5),
                             (bn.running_var, 0.5, 2.0)):
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)
    return bn.train()


def sample(shape, layout, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + offset  # a mean off zero: the shifted sums matter
    x.view(-1)[:: 7] = 0.0  # exact zeros: values the ReLU meets at its threshold after the shift
    return x.contiguous(memory_format=FORMATS[layout])


def run(fn, bn, x, grad, precision):
    """Output, input gradient and bn's parameter gradients of fn(x, bn), under bf16 autocast for "bf16"."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = fn(x, bn)
    y.backward(grad.to(y.dtype))
    params = {name: p.grad for name, p in bn.named_parameters()}
    return y.detach(), x.grad, params


def reference(relu):
    return lambda x, bn: torch.relu(bn(x)) if relu else bn(x)


def fused_fn(relu):
    return lambda x, bn: kernels.batch_norm_relu(x, bn, relu)


def bf16_input(x, precision):
    """The input as the batch norm sees it: under autocast, a conv's bf16 output."""
    return x.to(torch.bfloat16) if precision == "bf16" else x


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "bn-only"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_statistics_and_gradients_equal_pytorchs(fused, relu, layout, precision, shape):
    x = bf16_input(sample(shape, layout), precision)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    bn, bn_ref = batch_norm(shape[1]), batch_norm(shape[1])
    y, gx, gp = run(fused_fn(relu), bn, x, grad, precision)
    y_ref, gx_ref, gp_ref = run(reference(relu), bn_ref, x, grad, precision)
    assert y.dtype == y_ref.dtype == x.dtype and gx.dtype == x.dtype
    assert y.is_contiguous(memory_format=FORMATS[layout]) and gx.is_contiguous(memory_format=FORMATS[layout])
    tolerance = AGAINST_PYTORCH[precision]
    torch.testing.assert_close(y, y_ref, **tolerance["y"])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn_ref, name), rtol=tolerance["stats"], atol=1e-7,
                                   msg=name)
    close_to_scale(gx, gx_ref, tolerance["x"])
    for name, g in gp.items():  # float32 in both precisions: sums over N*H*W values
        close_to_scale(g, gp_ref[name], tolerance["params"])


def close_to_scale(actual, expected, fraction):
    """Each value within `fraction` of the largest expected value (and of its own)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=fraction, atol=fraction * scale + 1e-12)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "bn-only"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_results_are_roundings_of_the_exact_ones(fused, relu, layout, precision):
    """Against float64 on the same (bf16-rounded) input and output gradient: bf16 outputs and input
    gradients within one bf16 rounding, float32 ones and every parameter gradient within a few float32
    roundings."""
    shape = SHAPES["several-chunks"]
    x = bf16_input(sample(shape, layout), precision)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    y, gx, gp = run(fused_fn(relu), batch_norm(shape[1]), x, grad, "fp32")
    y_ex, gx_ex, gp_ex = run(reference(relu), batch_norm(shape[1]).double(), x.double(), grad.double(), "fp32")
    rounding = 2**-8 if precision == "bf16" else 1e-5
    scale = y_ex.abs().max().item()
    torch.testing.assert_close(y.double(), y_ex, rtol=rounding, atol=rounding * 2**-8 * scale)
    close_to_scale(gx.double(), gx_ex, 2**-8 if precision == "bf16" else 1e-6)
    for name, g in gp.items():
        close_to_scale(g.double(), gp_ex[name], 1e-6)


def test_gradients_of_a_relu_mask_match_pytorchs_exactly_where_values_are_exact(fused):
    """Inputs and gradients that are small integers: every sum is exact, so the fused input gradient
    equals PyTorch's to float32 rounding, and the ReLU blocks the same positions."""
    x = torch.randint(-3, 4, (6, 5, 4, 4)).float().contiguous(memory_format=torch.channels_last)
    grad = torch.randint(-2, 3, x.shape).float()
    bn, bn_ref = batch_norm(5), batch_norm(5)
    y, gx, _ = run(fused_fn(True), bn, x, grad, "fp32")
    y_ref, gx_ref, _ = run(reference(True), bn_ref, x, grad, "fp32")
    assert torch.equal(y > 0, y_ref > 0)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [3.0, 1000.0])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_statistics_are_float32_roundings_of_the_exact_ones(fused, offset, layout, precision):
    """Mean and variance over 8192 values per channel within a float32 rounding or two of the exact
    (float64) ones, also for a mean of 1000 (std 2): there the sum of squares, summed naively in
    float32, would lose most of the variance's digits."""
    x = bf16_input(sample((8, 17, 32, 32), layout, offset=offset), precision).requires_grad_()
    bn = batch_norm(17, momentum=1.0)  # the running statistics become the batch's
    kernels.batch_norm_relu(x, bn, relu=False)
    exact = x.detach().double()
    torch.testing.assert_close(bn.running_mean.double(), exact.mean((0, 2, 3)), rtol=2.5e-7, atol=0)
    torch.testing.assert_close(bn.running_var.double(), exact.var((0, 2, 3)), rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("channels", [17, 32])  # 32: whole blocks of 16 channels, one loop over all values
def test_results_do_not_depend_on_the_number_of_threads(fused, channels):
    x = sample((8, channels, 32, 32), "nhwc").to(torch.bfloat16).requires_grad_()
    grad = torch.randn(x.shape).to(torch.bfloat16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            bn = batch_norm(channels)
            y, gx, gp = run(fused_fn(True), bn, x, grad, "fp32")
            results.append((y, gx, gp["weight"], gp["bias"], bn.running_var))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("options", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)],
                         ids=["no-affine", "no-running-stats", "cumulative-average"])
def test_batch_norm_options_follow_pytorch(fused, options):
    x = sample((4, 6, 5, 5), "nhwc")
    grad = torch.randn(x.shape)
    bn, bn_ref = batch_norm(6, **options), batch_norm(6, **options)
    for _ in range(2):  # momentum=None: the second batch weighs 1/2
        y, gx, gp = run(fused_fn(True), bn, x, grad, "fp32")
        y_ref, gx_ref, gp_ref = run(reference(True), bn_ref, x, grad, "fp32")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    assert gp.keys() == gp_ref.keys()
    torch.testing.assert_close(bn.state_dict(), bn_ref.state_dict(), rtol=1e-6, atol=1e-7)


def test_output_gradient_of_another_layout(fused):
    x = sample((2, 8, 6, 6), "nhwc")
    grad = torch.randn(2, 6, 6, 8).permute(0, 3, 1, 2)  # neither layout's strides
    bn, bn_ref = batch_norm(8), batch_norm(8)
    gx = run(fused_fn(True), bn, x, grad, "fp32")[1]
    torch.testing.assert_close(gx, run(reference(True), bn_ref, x, grad, "fp32")[1], rtol=1e-4, atol=1e-5)


def test_what_stays_with_pytorch(fused):
    x = sample((2, 4, 5, 5), "nhwc").requires_grad_()
    assert fusable(x, batch_norm(4))
    assert not fusable(x, batch_norm(4).eval())  # eval: the running statistics
    assert not fusable(x.detach(), batch_norm(4))  # no autograd
    with torch.no_grad():
        assert not fusable(x, batch_norm(4))
    assert not fusable(x.double(), batch_norm(4).double())
    assert not fusable(x.half(), batch_norm(4))
    assert not fusable(x, batch_norm(4).double())  # float64 statistics
    hooked = batch_norm(4)
    hooked.register_forward_hook(lambda *args: None)
    assert not fusable(x, hooked)
    assert not fusable(x, type("MyBatchNorm", (nn.BatchNorm2d,), {})(4))  # may change forward
    assert not fusable(torch.randn(2, 4, 5, requires_grad=True), nn.BatchNorm1d(4))
    traced = torch.jit.trace(lambda t: kernels.batch_norm_relu(t, batch_norm(4), relu=True), x, check_trace=False)
    assert "vggkit::" not in str(traced.graph) and "aten::batch_norm" in str(traced.graph)
    eval_bn = batch_norm(4).eval()
    torch.testing.assert_close(kernels.batch_norm_relu(x, eval_bn, relu=True), torch.relu(eval_bn(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # PyTorch's message
        kernels.batch_norm_relu(torch.randn(1, 4, 1, 1, requires_grad=True), batch_norm(4), relu=True)


def test_unavailable_library_falls_back_to_pytorchs_module(monkeypatch, capsys):
    monkeypatch.setattr(build, "_noted", set())
    monkeypatch.setenv(build.SWITCH, "plain")
    monkeypatch.setattr(build, "LIBRARY", build.KernelLibrary())
    x = sample((2, 4, 5, 5), "nhwc")
    grad = torch.randn(x.shape)
    bn, bn_ref = batch_norm(4), batch_norm(4)
    y, gx, _ = run(fused_fn(True), bn, x, grad, "fp32")
    y_ref, gx_ref, _ = run(reference(True), bn_ref, x, grad, "fp32")
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert "VGGKIT_KERNELS=plain" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The fast preset's network


def fast_preset_pair():
    """The `fast` recipe's network (1x32,2x64,2x128 with batch norm, 28x28, channels-last), fused
    and plain, with the same weights, and an SGD optimizer for each."""
    config = resolve_config(overrides={"input_size": 28, "lr": 0.05})
    torch.manual_seed(0)
    model = config.build_model(1, 10).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model)
    assert set_kernels(model, "fast") == "fast" and set_kernels(plain, "plain") == "plain"
    return (model, make_optimizer(config, model)), (plain, make_optimizer(config, plain))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_preset_trains_alike_fused_and_plain(fused, precision):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (32,), generator=g)) for _ in range(3)]
    losses = []
    for model, optimizer in fast_preset_pair():
        model.train()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    fused_losses, plain_losses = losses[:3], losses[3:]
    tolerance = dict(rtol=1e-4, atol=0) if precision == "fp32" else dict(rtol=3e-2, atol=0)
    torch.testing.assert_close(fused_losses, plain_losses, **tolerance)
    assert fused_losses[-1] < fused_losses[0]  # it learns


def test_fast_preset_graph_and_state_dict(fused):
    (model, _), (plain, _) = fast_preset_pair()
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    calls = backward_ops(model(x).sum())
    # each block's last batch norm with its pool and ReLU (test_kernels_bn_pool.py), the other two alone; the
    # first block, one conv on the gray input, with its conv (test_kernels_conv_bn_pool.py)
    assert calls.count("ConvBatchNormPoolReLUBackward") == 1
    assert calls.count("BatchNormPoolReLUBackward") == 2 and calls.count("BatchNormReLUBackward") == 2
    assert "MaxPoolReLUBackward" not in calls
    assert not [c for c in calls if "NativeBatchNorm" in c]
    assert len([c for c in calls if "Relu" in c or "Threshold" in c]) == 2  # the classifier's
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain(x)  # the same batch through PyTorch's modules: the same running statistics
    torch.testing.assert_close(model.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-5)  # inference: PyTorch's batch norm
