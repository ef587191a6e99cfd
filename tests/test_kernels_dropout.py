"""The fast dropout masks (vggkit.kernels.dropout): scaling, gradient, unbiased masks, and when the
model uses them."""
import torch

from vggkit import kernels
from vggkit.model import VGG, set_kernels


def test_dropout_keeps_one_minus_p_scaled_and_its_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = kernels.dropout(x, 0.3)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, y.detach())
    torch.manual_seed(1)
    first = kernels.dropout(torch.ones(50), 0.5)
    torch.manual_seed(1)
    assert torch.equal(first, kernels.dropout(torch.ones(50), 0.5))  # the seed decides the mask


def test_dropout_masks_are_unbiased_at_every_position_and_odd_sizes():
    torch.manual_seed(0)
    kept = torch.stack([kernels.dropout(torch.ones(3, 7), 0.25) != 0 for _ in range(4000)]).float().mean(0)
    assert kept.shape == (3, 7)  # 21 values: not a whole number of 64-bit draws
    assert (kept - 0.75).abs().max().item() < 0.03  # each of a draw's four 16-bit parts, the sign bit too


def test_model_dropout_uses_the_fast_mask_only_when_training_fused():
    model = VGG("1x4", in_channels=1, input_size=8, fc_width=400, num_classes=3, dropout=0.5, batch_norm=False)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2
    set_kernels(model, "fast")
    x = torch.ones(64, 400)
    fast = drops[0](x)
    assert abs((fast == 0).float().mean().item() - 0.5) < 0.02 and fast.max().item() == 2.0
    drops[0].eval()
    assert torch.equal(drops[0](x), x)
    drops[0].train()
    set_kernels(model, "plain")
    assert drops[0].kernels == "plain" and abs((drops[0](x) == 0).float().mean().item() - 0.5) < 0.02
