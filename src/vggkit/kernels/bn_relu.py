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
(relu=False) then max_pool_relu to the bit; the gradients equal theirs to rounding. routing.py
decides where they run.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable



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


def compute(x: torch.Tensor, bn: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    """relu(bn(x)) (bn(x) without `relu`) on the kernels (the routing chose them: routing.py)."""
    return BatchNormReLU.apply(x, *module_arguments(bn), relu)


def compute_with_pool(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(max_pool2d(bn(x), 2, 2)) in one kernel (the routing chose it: routing.py)."""
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
