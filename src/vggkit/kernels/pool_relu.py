"""relu(max_pool2d(x, 2, 2)) as one autograd function on the C++ kernels (max_pool_relu.cpp).

PyTorch's max-pool backward fills the whole input gradient with zeros, then scatters the output
gradient through int64 indices; the ReLU costs two more passes. Here the forward is one pass that
also keeps one byte per output (where the max was, or that the ReLU blocked it), and the backward
writes each input-gradient value once from that byte. Results equal PyTorch's (ties and NaN alike).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


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


def compute(x: torch.Tensor, backward: bool) -> torch.Tensor:
    """relu(max_pool2d(x, 2, 2)) on the kernel, with its autograd function where `backward` (the routing
    chose it: routing.py)."""
    if backward:
        return MaxPoolReLU.apply(x)
    return torch.ops.vggkit.max_pool_relu(x)[0]
