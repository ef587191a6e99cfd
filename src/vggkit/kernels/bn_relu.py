"""Training-mode batch norm, optionally followed by ReLU, as one autograd function on the C++
kernels (batch_norm_relu.cpp); and batch norm, 2x2 max-pool and ReLU as another
(batch_norm_pool_relu.cpp), the end of a VGG block with batch norm.

PyTorch's CPU batch norm backward runs far below the memory's bandwidth on bfloat16 channels-last
tensors (issue 15), and a ReLU after the batch norm is two more passes over the tensor (clamp_min_,
threshold_backward). Here the forward reads x twice and writes y once; the backward reads x and
dy twice and writes dx once, with the ReLU's mask recomputed from x. Outputs, running statistics,
num_batches_tracked and gradients equal PyTorch's to rounding.

With the pool, the full-size normalised tensor and its gradient are never written: the forward
writes the pooled output and a code byte per output (where the max was, or that the ReLU blocked
it), the backward reads the pooled gradient and the codes. The forward equals batch_norm_relu
(relu=False) then max_pool_relu to the bit; the gradients equal theirs to rounding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .pool_relu import fusable as _fusable_input, hooked, max_pool_relu

DTYPES = (torch.float32, torch.bfloat16)


class BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, relu: bool):
        y, mean, invstd = torch.ops.vggkit.batch_norm_relu(x, weight, bias, running_mean, running_var,
                                                           momentum, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.relu = relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.vggkit.batch_norm_relu_backward(grad, x, weight, bias, mean,
                                                                                   invstd, ctx.relu)
        return (grad_x, grad_weight if weight is not None else None, grad_bias if bias is not None else None,
                None, None, None, None, None)


class BatchNormPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        y, code, mean, invstd = torch.ops.vggkit.batch_norm_pool_relu(x, weight, bias, running_mean, running_var,
                                                                      momentum, eps)
        ctx.save_for_backward(x, weight, bias, code, mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, code, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.vggkit.batch_norm_pool_relu_backward(grad, code, x, weight, bias,
                                                                                        mean, invstd)
        return (grad_x, grad_weight if weight is not None else None, grad_bias if bias is not None else None,
                None, None, None, None)


def batch_norm_fusable(x: torch.Tensor, bn: nn.Module) -> bool:
    """Whether the fused kernels take bn(x): an nn.BatchNorm2d (no subclass) in training mode without
    hooks, with float32 parameters and statistics, and more than one value per channel, on an input
    that `kernels.fusable` takes in float32 or bfloat16, outside tracing. Everything else (exporters
    included) keeps PyTorch's module."""
    return (module_fusable(bn, x.device) and x.dtype in DTYPES and x.dim() == 4 and x.numel() > x.shape[1] > 0
            and _fusable_input(x))


def module_fusable(bn: nn.Module, device: torch.device) -> bool:
    """The module's part of batch_norm_fusable: an nn.BatchNorm2d (no subclass) in training mode
    without hooks, its parameters and statistics float32 and contiguous on `device`, outside tracing."""
    if type(bn) is not nn.BatchNorm2d or not bn.training or hooked(bn) or torch.jit.is_tracing():
        return False
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return all(t is None or (t.dtype == torch.float32 and t.device == device and t.is_contiguous()) for t in tensors)


def batch_norm_relu(x: torch.Tensor, bn: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    """relu(bn(x)) (bn(x) without `relu`): the fused kernels where `batch_norm_fusable(x, bn)`,
    else PyTorch's module and torch.relu."""
    if not batch_norm_fusable(x, bn):
        y = bn(x)
        return torch.relu(y) if relu else y
    return BatchNormReLU.apply(x, *module_arguments(bn), relu)


def batch_norm_pool_fusable(x: torch.Tensor, bn: nn.Module) -> bool:
    """Whether BatchNormPoolReLU takes relu(max_pool2d(bn(x), 2, 2)): as `batch_norm_fusable`, on a
    height and width of at least 2 (a pooled output that is not empty)."""
    return batch_norm_fusable(x, bn) and x.shape[-2] >= 2 and x.shape[-1] >= 2


def batch_norm_pool_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(max_pool2d(bn(x), 2, 2)): one fused kernel where `batch_norm_pool_fusable(x, bn)`, else
    batch_norm_relu (without ReLU) then max_pool_relu, each fused where it can be."""
    if not batch_norm_pool_fusable(x, bn):
        return max_pool_relu(batch_norm_relu(x, bn, relu=False))
    return BatchNormPoolReLU.apply(x, *module_arguments(bn))


def module_arguments(bn: nn.BatchNorm2d) -> tuple:
    """The kernels' arguments from bn: weight, bias, running mean and variance (None where it keeps
    none), momentum and eps; the batch counted as the module counts it."""
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    return (bn.weight, bn.bias, *running, _count_batch(bn), bn.eps)


def _count_batch(bn: nn.BatchNorm2d) -> float:
    """What nn.BatchNorm2d.forward does in training before it normalises: count the batch in
    num_batches_tracked; returns the running statistics' momentum (a cumulative average's without one)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum
