"""The weight gradient of a 3x3 convolution on the CPU's AMX matrix units (conv_weight_grad.cpp),
where it measured faster than oneDNN's.

Measured (benchmarks/bench_kernels.py, weight + bias gradients, bf16 channels-last, 2 threads of an
Intel Xeon with AMX, 2026-11-24; oneDNN / this, ms): fast preset 256x32x14x14 -> 64 1.5 / 1.2,
256x64x14x14 -> 64 4.0 / 1.9, 256x64x7x7 -> 128 2.4 / 1.0, 256x128x7x7 -> 128 5.5 / 1.7; d2l
128x64x56x56 -> 64 24.0 / 16.2, 128x64x28x28 -> 128 8.5 / 6.5, 128x128x28x28 -> 128 17.6 / 11.0,
128x128x14x14 -> 128 5.4 / 2.9, and about even at 128x32x56x56 -> 64 (10.6 / 11.0); but
128x16x112x112 -> 32 14.6 / 18.4: with one block of 16 input channels laying the operands out costs
more than the products gain. Hence at least MIN_IN_CHANNELS input channels (32: the fast preset's
32-channel layer gains 1.25x; d2l's is about even).
"""
from __future__ import annotations

import functools

import torch

from . import build

MIN_IN_CHANNELS = 32


def applies(x_shape, weight_shape, dtype: torch.dtype, stride, padding, dilation, groups) -> bool:
    """Whether the weight gradient of a CPU conv2d computing in `dtype` runs on the matrix units:
    bf16, 3x3 weights, stride 1, padding 1, no dilation or groups, channels multiples of 16, at
    least MIN_IN_CHANNELS in, AMX present (and the library built)."""
    return (dtype == torch.bfloat16 and len(x_shape) == 4 and tuple(weight_shape[2:]) == (3, 3)
            and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1
            and x_shape[1] % 16 == 0 and weight_shape[0] % 16 == 0 and x_shape[1] >= MIN_IN_CHANNELS
            and build.LIBRARY.available() and _amx())


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2d's float32 weight and bias gradients, [out, in, 3, 3] and [out], from its output gradient
    and input."""
    return torch.ops.vggkit.conv3x3_weight_grad(grad, x)


@functools.lru_cache(maxsize=None)
def _amx() -> bool:
    """Whether the CPU has AMX and Linux lets this process use it (asked once)."""
    return bool(torch.ops.vggkit.conv3x3_weight_grad_available())
