"""Dropout with its mask drawn as random bits on the CPU.

PyTorch's CPU dropout draws its mask with bernoulli_, one scalar draw at a time (BENCHMARKS.md has
what that costs the d2l classifier, two masks a step). 64-bit random integers, each cut into four
16-bit draws, fill it in one vectorised pass (faster than torch.rand's floats too). A value is kept
where its 16-bit draw u (uniform on 0..65535) is at least round(p * 65536): the keep probability is
1 - p to within 2^-17 (exactly for p = 0.5 and other multiples of 2^-16), and kept values are
scaled by 1 / (1 - p) as F.dropout scales them. Another random stream than F.dropout's.
"""
from __future__ import annotations

import torch

DRAWS_PER_WORD = 4  # 16-bit draws per 64-bit random integer


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with each value zeroed with probability p and the rest scaled by 1 / (1 - p)."""
    return x * keep_mask(x.shape, p, x.dtype)


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / (1 - p) with probability 1 - p, else 0, in `dtype`."""
    count = shape.numel()
    words = torch.empty(-(-count // DRAWS_PER_WORD), dtype=torch.int64).random_(-2**63, 2**63 - 1)
    draws = words.view(torch.int16)[:count].view(shape)  # signed: u - 32768
    threshold = round(p * 65536) - 32768
    return (draws >= threshold).to(dtype).mul_(1 / (1 - p))
