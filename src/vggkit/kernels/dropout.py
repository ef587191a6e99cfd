"""Dropout with its mask drawn by torch.rand on the CPU.

PyTorch's CPU dropout draws its mask with bernoulli_, one scalar draw at a time: on the 2-core
Xeon of BENCHMARKS.md, 5.9 ms per [128, 4096] mask (the d2l classifier draws two a step), where
torch.rand's vectorised generator fills the same tensor in about 1/20 of that. Same
distribution and scaling as F.dropout (keep with probability 1 - p, scale by 1 / (1 - p)); another
random stream.
"""
from __future__ import annotations

import torch


def dropout_fusable(x: torch.Tensor, p: float) -> bool:
    return x.device.type == "cpu" and x.is_floating_point() and 0 < p < 1 and not torch.compiler.is_compiling()


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with each value zeroed with probability p and the rest scaled by 1 / (1 - p)."""
    mask = (torch.rand(x.shape, device=x.device) >= p).to(x.dtype).mul_(1 / (1 - p))
    return x * mask
