"""Small helpers shared by the tests (tests/ is on sys.path under pytest's default import mode)."""
import torch
from torch import nn


def like_trained(model: nn.Module, weight_noise: float = 0.0) -> nn.Module:
    """`model` in eval mode with batch-norm statistics away from their defaults (and, with
    weight_noise, weights moved off their init), as a trained network's would be."""
    with torch.no_grad():
        if weight_noise:
            for p in model.parameters():
                p.add_(torch.randn_like(p) * weight_noise)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()
