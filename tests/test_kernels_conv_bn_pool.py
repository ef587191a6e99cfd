"""A first block with batch norm as one function (vggkit.kernels.conv_batch_norm_pool_relu: 3x3 conv
-> training-mode batch norm -> ReLU -> 2x2 max-pool, the statistics in closed form from the input's
moments) against PyTorch's modules with autograd: outputs, running statistics, the conv's and the
batch norm's gradients, in float32 and bf16 autocast; the moments themselves; where it applies;
the network's dispatch, fused against plain."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_no_further_off, backward_ops, require_kernels, train_step

from vggkit import kernels
from vggkit.kernels import build
from vggkit.model import VGG, set_kernels

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (input channels, output channels, conv bias, batch norm affine, batch norm momentum, batch, height, width)
CASES = {"gray-16": (1, 16, True, True, 0.1, 4, 18, 18), "rgb-odd-no-bias": (3, 20, False, True, 0.1, 3, 11, 13),
         "gray-not-affine-cumulative": (1, 8, True, False, None, 2, 7, 6)}


def fusable(conv, bn, x) -> bool:
    """Whether the kernels can take relu(max_pool2d(bn(conv(x)))) (measured speed aside)."""
    return not kernels.why_not("conv_batch_norm_pool_relu", [conv, bn], x, tuned=False)


@pytest.fixture(scope="module", autouse=True)
def library():
    require_kernels()


def make_block(cin, cout, bias, affine, momentum, seed=0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout, affine=affine, momentum=momentum)
    with torch.no_grad():
        if affine:  # not the initial 1 and 0: the gradients then depend on them
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn.running_var.fill_(2.0)
    return conv, bn


def make_input(n, cin, h, w, layout="nchw", seed=1):
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(seed)) * 0.7 + 0.3  # mean not 0
    return x.contiguous(memory_format=FORMATS[layout])


def plain(conv, bn, x):
    return torch.relu(F.max_pool2d(bn(conv(x)), 2, 2))


def parameters(conv, bn):
    return [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]


def run(function, conv, bn, x, precision="fp32", grad_seed=2):
    """The output, the parameters' gradients and the batch norm's buffers after one call."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = function(conv, bn, x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    grads = torch.autograd.grad(y, parameters(conv, bn), g)
    return y, grads, [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_float32_equals_pytorchs_modules(layout, case):
    cin, cout, bias, affine, momentum, n, h, w = CASES[case]
    conv, bn = make_block(cin, cout, bias, affine, momentum)
    conv_ref, bn_ref = copy.deepcopy((conv, bn))
    x = make_input(n, cin, h, w, layout)
    ours = [run(kernels.conv_batch_norm_pool_relu, conv, bn, x) for _ in range(2)]  # the running statistics twice
    reference = [run(plain, conv_ref, bn_ref, x) for _ in range(2)]
    for (y, grads, buffers), (y_ref, grads_ref, buffers_ref) in zip(ours, reference):
        assert type(y.grad_fn).__name__ == "ConvBatchNormPoolReLUBackward"
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        scale = max(b.abs().max().item() for b in grads_ref)
        for a, b in zip(grads, grads_ref):  # the conv bias's gradient is 0, in PyTorch's to rounding
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        for a, b in zip(buffers, buffers_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_as_close_to_float64_as_pytorchs_bfloat16():
    """Under bf16 autocast both paths round (differently); measured against the float64 computation
    of the same bf16 inputs, ours is no further off than PyTorch's, within a factor for the noise."""
    conv, bn = make_block(1, 32, True, True, 0.1)
    x = make_input(32, 1, 28, 28, "nhwc").bfloat16().float()
    truth = run(plain, conv.double(), bn.double(), x.double())
    conv, bn = make_block(1, 32, True, True, 0.1)
    ours = run(kernels.conv_batch_norm_pool_relu, *copy.deepcopy((conv, bn)), x, "bf16")
    theirs = run(plain, conv, bn, x, "bf16")
    assert ours[0].dtype == torch.bfloat16

    def error(result, reference):
        return ((result.double() - reference).norm() / reference.norm()).item()
    assert error(ours[0], truth[0]) < 2 * error(theirs[0], truth[0]) + 1e-3
    for index in (0, 2, 3):  # the conv weight, bn weight and bias (the conv bias's is 0 in truth)
        ours_off, theirs_off = error(ours[1][index], truth[1][index]), error(theirs[1][index], truth[1][index])
        assert ours_off < 2 * theirs_off + 1e-2, index
    for a, b in zip(ours[2][:2], truth[2][:2]):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("layout", FORMATS)
def test_moments_are_the_padded_taps_sums_and_products(layout):
    for cin, dtype in ((1, torch.bfloat16), (3, torch.float32)):
        x = make_input(3, cin, 9, 7, layout).to(dtype)
        gram, sums = torch.ops.vggkit.conv3x3_input_moments(x)
        taps = F.unfold(x.double(), 3, padding=1)  # [N, cin * 9, pixels]
        tolerance = 1e-6 if dtype == torch.bfloat16 else 1e-5  # float32 products, summed in float per image
        torch.testing.assert_close(sums, taps.sum((0, 2)), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(gram, torch.einsum("nkp,njp->kj", taps, taps), rtol=tolerance, atol=tolerance)


def test_the_result_does_not_depend_on_the_thread_count():
    conv, bn = make_block(1, 16, True, True, 0.1)
    x = make_input(64, 1, 16, 16, "nhwc")
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            y, grads, _ = run(kernels.conv_batch_norm_pool_relu, *copy.deepcopy((conv, bn)), x)
            results.append((y, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fuses_only_a_block_it_can_compute():
    conv, bn = make_block(1, 8, True, True, 0.1)
    x = make_input(2, 1, 8, 8)
    assert fusable(conv, bn, x)
    assert not fusable(conv, bn, x.requires_grad_())  # not a first layer
    x = make_input(2, 1, 8, 8)
    bn.eval()
    assert not fusable(conv, bn, x)
    bn.train()
    handle = bn.register_forward_hook(lambda *args: None)
    assert not fusable(conv, bn, x)
    handle.remove()
    assert not fusable(conv, nn.BatchNorm2d(4), x)  # not the conv's channels
    assert not fusable(conv, bn, make_input(1, 1, 1, 1))  # one value per channel
    with torch.no_grad():
        assert not fusable(conv, bn, x)


def network_and_batch(layout):
    torch.manual_seed(0)
    model = VGG("1x8,1x16", in_channels=1, input_size=32, fc_width=32, num_classes=5, dropout=0.0,
                batch_norm=True).to(memory_format=FORMATS[layout])
    return model, make_input(16, 1, 32, 32, layout), torch.randint(0, 5, (16,))


@pytest.mark.parametrize("layout", FORMATS)
def test_network_fused_equals_plain(layout):
    model, x, y = network_and_batch(layout)
    plain_model = copy.deepcopy(model)
    assert set_kernels(model, "fast") == "fast" and set_kernels(plain_model, "plain") == "plain"
    loss, grads = train_step(model, x, y, "fp32")
    loss_plain, grads_plain = train_step(plain_model, x, y, "fp32")
    torch.testing.assert_close(loss, loss_plain, rtol=1e-5, atol=0)
    for name, grad in grads.items():  # the conv bias's gradient is 0 here, PyTorch's 0 to rounding
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-4, atol=1e-5, msg=name)
    for name, buffer in model.state_dict().items():
        torch.testing.assert_close(buffer, plain_model.state_dict()[name], msg=name)
    calls = backward_ops(model(x).sum())
    assert calls.count("ConvBatchNormPoolReLUBackward") == 1 and "MaxPool2DWithIndicesBackward0" not in calls


@pytest.mark.slow
@pytest.mark.parametrize("layout", FORMATS)
def test_network_in_bfloat16_as_close_to_float32_as_plain(layout):
    """In bf16 each gradient of the fused blocks is no further from the float32 one than the plain
    blocks' (helpers.assert_no_further_off). (Through the blocks
    only, from a fixed gradient: in the small classifier one ReLU flipping between the two roundings
    moves its gradients by several percent.)"""
    model, x, _ = network_and_batch(layout)
    models = [copy.deepcopy(model) for _ in range(3)]
    for m, mode in zip(models, ("fast", "plain", "plain")):
        set_kernels(m, mode)
    g = torch.randn(models[0].forward_features(x).shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for m, precision in zip(models, ("bf16", "bf16", "fp32")):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            m.forward_features(x).float().backward(g)
        grads.append({name: p.grad for name, p in m.features.named_parameters()})
    assert_no_further_off(*grads)


def test_the_network_fuses_gray_first_blocks_only():
    for channels, expected in ((1, 1), (3, 0)):
        model = VGG("1x8,1x16", in_channels=channels, input_size=16, fc_width=16, num_classes=3, batch_norm=True)
        set_kernels(model, "fast")
        calls = backward_ops(model(make_input(2, channels, 16, 16)).sum())
        assert calls.count("ConvBatchNormPoolReLUBackward") == expected


@pytest.mark.slow
def test_without_the_library_the_network_trains_and_evaluates_as_plain(monkeypatch):
    """The library switched off: the first block runs PyTorch's modules in training; inference still
    folds the batch norms (oneDNN), with PyTorch's pool."""
    monkeypatch.setenv(build.SWITCH, "plain")
    monkeypatch.setattr(build, "LIBRARY", build.KernelLibrary())
    monkeypatch.setattr(build, "_noted", set())
    model, x, y = network_and_batch("nhwc")
    plain_model = copy.deepcopy(model)
    for block in model.features:
        block.kernels = "fused"  # as if set before the library was found missing
    set_kernels(plain_model, "plain")
    conv, bn = model.features[0][0], model.features[0][1]
    assert not fusable(conv, bn, x)
    loss, grads = train_step(model, x, y, "fp32")
    loss_plain, grads_plain = train_step(plain_model, x, y, "fp32")
    torch.testing.assert_close(loss, loss_plain)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_plain[name], msg=name)
    model.eval(), plain_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain_model(x), rtol=1e-4, atol=1e-5)
