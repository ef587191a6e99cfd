"""Inference through a VGG block with batch norm: each eval-mode BatchNorm2d folded into the
convolution before it (weight x gamma / sqrt(var + eps), (bias - mean) x gamma / sqrt(var + eps) +
beta), the convolution and its ReLU as one oneDNN call, then the pool; on a gray first block the
conv + ReLU + pool kernel (conv_pool_relu.cpp) with the folded weights.

PyTorch's eval-mode network writes each convolution's output, reads it for the batch norm, writes
that, then the ReLU and the pool pass over it again. Folding the batch norm is exact in real
numbers; in bf16 the folded weights are rounded once where PyTorch rounds the convolution's output
before normalising it. Per-epoch evaluation, evaluate and predict run through it (grad mode off);
training keeps batch statistics (bn_relu.py, conv_pool.py). The state dict is untouched: the
folded weights are made per call, a few thousand multiplies.
"""
from __future__ import annotations

import torch
from torch import nn

from .conv_pool import conv_pool_relu_faster
from .conv_relu import _convolution_fusable
from .conv_relu import _dtype as compute_dtype
from .pool_relu import hooked, max_pool_relu


def block_foldable(body: list[nn.Module], x: torch.Tensor) -> bool:
    """Whether `body` (a block's layers before its last ReLU and pool: [conv, bn, ReLU] x (n - 1),
    then conv, bn) can run folded on x: grad mode off, every batch norm an nn.BatchNorm2d in eval
    mode with running statistics, no hooks, convolutions oneDNN takes (conv_relu.py)."""
    if torch.is_grad_enabled() or len(body) % 3 != 2 or hooked(*body):
        return False
    convs, norms, relus = body[0::3], body[1::3], body[2::3]
    return (all(isinstance(relu, nn.ReLU) for relu in relus)
            and all(type(bn) is nn.BatchNorm2d and not bn.training and bn.running_var is not None for bn in norms)
            and all(isinstance(conv, nn.Conv2d) and conv.out_channels == bn.num_features
                    for conv, bn in zip(convs, norms))
            and all(_convolution_fusable(conv, x) for conv in convs))


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """bn(conv(x)) in eval mode as one convolution's weight and bias."""
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    bias = bias * scale if bn.bias is None else torch.addcmul(bn.bias, bias, scale)
    return conv.weight * scale.view(-1, 1, 1, 1), bias


def block(body: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(body(x), 2, 2)) with the batch norms folded (see block_foldable)."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    convs, norms = body[0::3], body[1::3]
    for i, (conv, bn) in enumerate(zip(convs, norms)):
        weight, bias = folded(conv, bn)
        if i == len(convs) - 1 and conv_pool_relu_faster(conv, x):  # a gray first block
            return torch.ops.vggkit.conv_pool_relu(x, weight, bias)[0]
        x = torch.ops.mkldnn._convolution_pointwise(x, weight.to(dtype), bias.to(dtype), list(conv.padding),
                                                    list(conv.stride), list(conv.dilation), conv.groups, "relu",
                                                    [], None)
    # ReLU'd already (the ReLU again changes nothing); the pool kernel's forward measured 4-8% faster
    # inference than PyTorch's pool
    return max_pool_relu(x)
