"""Inference through a VGG block with batch norm: each eval-mode BatchNorm2d folded into the
convolution before it (weight x gamma / sqrt(var + eps), (bias - mean) x gamma / sqrt(var + eps) +
beta), the convolution and its ReLU as one oneDNN call, then the pool; on a gray first block the
conv + ReLU + pool kernel (conv_pool_relu.cpp) with the folded weights.

PyTorch's eval-mode network writes each convolution's output, reads it for the batch norm, writes
that, then the ReLU and the pool pass over it again. Folding the batch norm is exact in real
numbers; in bf16 the folded weights are rounded once where PyTorch rounds the convolution's output
before normalising it. Per-epoch evaluation, evaluate and predict run through it (grad mode off);
training keeps batch statistics (bn_relu.py, conv_pool.py). The state dict is untouched: the
folded weights are made per call, a few thousand multiplies. routing.py decides where it runs.
"""
from __future__ import annotations

import torch
from torch import nn

from .conv_relu import _dtype as compute_dtype


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """bn(conv(x)) in eval mode as one convolution's weight and bias."""
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    bias = bias * scale if bn.bias is None else torch.addcmul(bn.bias, bias, scale)
    return conv.weight * scale.view(-1, 1, 1, 1), bias


def compute(body: list[nn.Module], x: torch.Tensor, pooled: bool) -> torch.Tensor:
    """body(x) with the batch norms folded (body: a block's layers before its last ReLU and pool,
    [conv, bn, ReLU] x (n - 1), then conv, bn, eval mode; the routing chose it: routing.py); where
    `pooled`, the last conv's ReLU and the block's pool too, by the conv + pool kernel (a gray first
    block)."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    convs, norms = body[0::3], body[1::3]
    for i, (conv, bn) in enumerate(zip(convs, norms)):
        weight, bias = folded(conv, bn)
        if pooled and i == len(convs) - 1:
            return torch.ops.vggkit.conv_pool_relu(x, weight, bias)[0]
        x = torch.ops.mkldnn._convolution_pointwise(x, weight.to(dtype), bias.to(dtype), list(conv.padding),
                                                    list(conv.stride), list(conv.dilation), conv.groups, "relu",
                                                    [], None)
    return x  # ReLU'd already: the block's pool and last ReLU follow (the ReLU again changes nothing)
