"""A network's first block, 3x3 conv -> ReLU -> 2x2 max-pool, as one autograd function on the C++
kernels (conv_pool_relu.cpp), for inputs of 1 to 4 channels that need no gradient.

On the d2l preset (1 -> 16 channels at 224x224, batch 128) oneDNN's convolution writes a 206 MB
output that the pool reads, and the backward writes an input gradient of the same size for the
convolution's weight-gradient pass to read again. Here the forward computes each pooled output's
four convolution values in registers and writes only the pooled output and one code byte per
output (max_pool_relu.cpp's); the backward computes the weight and bias gradients from the output
gradient, the codes and the input, and no input gradient. Results equal conv -> ReLU -> pool up to
the convolution's summation order (in bf16, one rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import build
from .conv_relu import _dtype as compute_dtype
from .pool_relu import hooked

DTYPES = (torch.float32, torch.bfloat16)
MAX_IN_CHANNELS = 4  # the C++ kernel's: gray and RGB(A) first layers
# Where the network uses it (VGGBlock): gray first layers only. Measured (benchmarks/bench_kernels.py,
# bf16 channels-last, 2 threads): 128x1x224x224 -> 16 forward 2.35x and backward 7.5x PyTorch's, but
# 64x3x64x64 -> 32 forward 0.78x (oneDNN's convolution uses the matrix units there).
FASTER_IN_CHANNELS = 1


class ConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        y, code = torch.ops.vggkit.conv_pool_relu(x, weight, bias)
        ctx.save_for_backward(x, weight, code)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, code = ctx.saved_tensors
        grad_weight, grad_bias = torch.ops.vggkit.conv_pool_relu_backward(grad, code, x, weight)
        return (None, grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None)


def conv_pool_relu_fusable(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether relu(max_pool2d(conv(x), 2, 2)) can run as ConvPoolReLU: an nn.Conv2d (no subclass)
    without hooks, 3x3, stride 1, zero padding 1, no dilation or groups, 1 to MAX_IN_CHANNELS input
    channels, whose weight needs a gradient and whose input does not (a network's first layer); a
    4-D float32 or bfloat16 CPU input (under CPU autocast, bfloat16 its dtype; else the weight's);
    autograd recording, outside torch.compile and tracing, with the library built."""
    if type(conv) is not nn.Conv2d or hooked(conv) or not _first_layer_geometry(conv):
        return False
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled("cpu"):
        same_dtype = bias is None or bias.dtype == weight.dtype
    else:
        same_dtype = x.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() == 4
            and x.shape[1] == conv.in_channels and min(x.shape[2:]) >= 2 and not x.requires_grad
            and weight.requires_grad and x.dtype in DTYPES and weight.dtype in DTYPES
            and compute_dtype(x) in DTYPES and same_dtype and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and build.LIBRARY.available())


def conv_pool_relu_faster(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether the network should run relu(max_pool2d(conv(x))) as ConvPoolReLU: it can
    (conv_pool_relu_fusable) and it measured faster than oneDNN's convolution then the pool kernel
    for this many input channels (FASTER_IN_CHANNELS)."""
    return conv_pool_relu_fusable(conv, x) and conv.in_channels <= FASTER_IN_CHANNELS


def _first_layer_geometry(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and 1 <= conv.in_channels <= MAX_IN_CHANNELS)


def conv_pool_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2, 2)): the fused kernels where `conv_pool_relu_fusable(conv, x)`
    (in the dtype autocast would give the convolution), else PyTorch's ops."""
    if not conv_pool_relu_fusable(conv, x):
        return torch.relu(F.max_pool2d(conv(x), 2, 2))
    return ConvPoolReLU.apply(x.to(compute_dtype(x)), conv.weight, conv.bias)
