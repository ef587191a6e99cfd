"""Inference through VGG blocks with batch norm, the batch norms folded into the convolutions
(vggkit.kernels.folded): the fused network's eval-mode outputs against PyTorch's modules in float32
and bf16, gray and RGB; where it applies (grad mode off, eval-mode batch norms, no hooks)."""
import copy

import pytest
import torch
from helpers import backward_ops, like_trained, require_kernels

from vggkit import kernels
from vggkit.model import VGG, set_kernels


def foldable(body, x) -> bool:
    """Whether the routing folds the block's batch norms into its convs."""
    return not kernels.why_not("folded_block", body, x)


@pytest.fixture(scope="module", autouse=True)
def library():
    require_kernels()


def networks(channels: int, arch: str = "1x8,2x16"):
    torch.manual_seed(0)
    model = like_trained(VGG(arch, in_channels=channels, input_size=16, fc_width=32, num_classes=5, batch_norm=True),
                         weight_noise=0.05).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model)
    assert set_kernels(model, "fast") == "fast" and set_kernels(plain, "plain") == "plain"
    x = torch.randn(8, channels, 16, 16).contiguous(memory_format=torch.channels_last)
    return model, plain, x


@pytest.mark.parametrize("channels", (1, 3))
@pytest.mark.parametrize("precision", ("fp32", "bf16"))
def test_eval_outputs_equal_pytorchs(channels, precision):
    model, plain, x = networks(channels)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ours, theirs = model(x), plain(x)
        features, plain_features = model.forward_features(x), plain.forward_features(x)
    tolerance = 1e-4 if precision == "fp32" else 3e-2  # bf16: one rounding of the folded weights, not of conv(x)
    for a, b in ((ours, theirs), (features, plain_features)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tolerance


def test_where_it_applies():
    model, _, x = networks(1)
    body = list(model.features[1])[:-2]  # [conv, bn, ReLU, conv, bn]
    with torch.no_grad():
        assert foldable(body, x.new_empty(8, 8, 8, 8))
        assert not foldable(body[:-1], x)  # not a block's body
        body[1].train()
        assert not foldable(body, x)  # batch statistics: bn_relu.py's kernels
        body[1].eval()
        handle = body[4].register_forward_hook(lambda *args: None)
        assert not foldable(body, x)  # the hook sees the batch norm's own output
        handle.remove()
    assert not foldable(body, x)  # grad mode on: the batch norms' parameters may be trained


def test_gradients_still_flow_in_eval_mode():
    """Eval mode with grad mode on (fine-tuning with frozen statistics, saliency maps): the modules."""
    model, plain, x = networks(1)
    x.requires_grad_()
    calls = backward_ops(model(x).sum())
    assert "NativeBatchNormBackward0" in calls
    grad = torch.autograd.grad(model(x).sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(plain(x).sum(), x)[0], rtol=1e-4, atol=1e-5)


def test_a_network_without_batch_norm_keeps_its_path():
    torch.manual_seed(0)
    model = VGG("2x8,1x16", in_channels=1, input_size=16, fc_width=16, num_classes=3, batch_norm=False).eval()
    set_kernels(model, "fast")
    with torch.no_grad():
        assert not foldable(list(model.features[0])[:-2], torch.randn(2, 1, 16, 16))  # conv, ReLU, conv
