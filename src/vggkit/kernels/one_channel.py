"""A convolution of a one-channel image, run as a two-channel one on the CPU.

oneDNN takes a slow path for a channels-last convolution with one input channel: on the 2-core
Xeon of BENCHMARKS.md (torch 2.13, bf16, batch 128 at 224x224, 16 filters) 64.5 ms forward and
78 ms for the weight gradient, against 16.9 and 27.7 ms with a second input channel of zeros. The
zero channel meets zero weights: the sums are those of the one-channel convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def widens(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv(x)` is a one-channel convolution on the CPU that conv_one_channel runs faster."""
    return (isinstance(conv, nn.Conv2d) and conv.in_channels == 1 and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.device.type == "cpu" and x.dim() == 4 and not torch.compiler.is_compiling())


def wide_input(x: torch.Tensor) -> torch.Tensor:
    """[x, 0] along the channels, channels-last."""
    n, _, h, w = x.shape
    wide = x.new_zeros((n, h, w, 2))
    wide[..., 0] = x[:, 0]
    return wide.permute(0, 3, 1, 2)


def wide_weight(weight: torch.Tensor) -> torch.Tensor:
    return F.pad(weight, (0, 0, 0, 0, 0, 1))


def conv_one_channel(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a one-channel x, computed on [x, 0] with weights [w, 0]."""
    return conv._conv_forward(wide_input(x), wide_weight(conv.weight), conv.bias)
