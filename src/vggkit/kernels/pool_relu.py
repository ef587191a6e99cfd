"""relu(max_pool2d(x, 2, 2)) as one autograd function on the C++ kernels (max_pool_relu.cpp).

PyTorch's max-pool backward fills the whole input gradient with zeros, then scatters the output
gradient through int64 indices; the ReLU costs two more passes. Here the forward is one pass that
also keeps one byte per output (where the max was, or that the ReLU blocked it), and the backward
writes each input-gradient value once from that byte. Results equal PyTorch's (ties and NaN alike).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import build

DTYPES = (torch.float32, torch.bfloat16, torch.float64)


class MaxPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, code = torch.ops.vggkit.max_pool_relu(x)
        ctx.save_for_backward(code)
        ctx.input_size = tuple(x.shape[-2:])
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (code,) = ctx.saved_tensors
        return torch.ops.vggkit.max_pool_relu_backward(grad, code, *ctx.input_size)


def hooked(*modules: torch.nn.Module) -> bool:
    """Whether any of `modules` has forward (pre-)hooks: such layers run as they are, never fused,
    so that the hooks see the tensors they expect."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def fusable(x: torch.Tensor) -> bool:
    """Whether the fused kernels take x in training: a 4-D CPU tensor of a supported dtype that
    autograd tracks (other devices keep PyTorch's ops), outside torch.compile, with the library built."""
    return takes(x) and x.requires_grad and torch.is_grad_enabled()


def takes(x: torch.Tensor) -> bool:
    """Whether the kernel takes x, in training (fusable) or inference (its forward alone: faster than
    PyTorch's pool there too, which computes int64 indices either way; BENCHMARKS.md, sixth session)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in DTYPES and not torch.compiler.is_compiling()
            and build.LIBRARY.available())


def max_pool_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(x, 2, 2)): the fused kernels where `takes(x)` (with autograd where `fusable(x)`),
    else PyTorch's ops."""
    if fusable(x):
        return MaxPoolReLU.apply(x)
    if takes(x):  # no gradient to record: the forward alone
        return torch.ops.vggkit.max_pool_relu(x)[0]
    return torch.relu(F.max_pool2d(x, 2, 2))
