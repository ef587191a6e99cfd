"""The weight gradient of a 3x3 convolution on the CPU's AMX matrix units (conv_weight_grad.cpp),
where it measured faster than oneDNN's: bf16, stride 1, padding 1, channels multiples of 16, at
least tuning.MIN_IN_CHANNELS input channels (with one block of 16 input channels, laying out the
operands costs more than the products gain). routing.py decides where it runs.
"""
from __future__ import annotations

import functools

import torch


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2d's float32 weight and bias gradients, [out, in, 3, 3] and [out], from its output gradient
    and input."""
    return torch.ops.vggkit.conv3x3_weight_grad(grad, x)


@functools.lru_cache(maxsize=None)
def _amx() -> bool:
    """Whether the CPU has AMX and Linux lets this process use it (asked once)."""
    return bool(torch.ops.vggkit.conv3x3_weight_grad_available())
