"""relu(conv2d(x)) as one oneDNN convolution with a ReLU post-op, forward and backward, on the CPU.

PyTorch runs the convolution, then the ReLU as a second pass over the output. oneDNN applies the
ReLU as the convolution writes its output (mkldnn::_convolution_pointwise, the op inductor uses);
the backward masks the gradient by the output and calls PyTorch's convolution backward, with the
weight gradient on the matrix units where conv_weight_grad.py applies. Results equal PyTorch's (the
same convolution and the same ReLU; the weight gradient up to the order of its sums). Without the
ReLU (`conv_relu(conv, x, relu=False)`) the same function serves a convolution whose weight gradient
runs there. routing.py decides where it runs and whether the weight gradient takes the tiles.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import conv_weight_grad


class ConvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride, dilation, groups, relu=True, tiles=False):
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                    "relu" if relu else "none", [], None)
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.setting = (stride, padding, dilation, groups, None if bias is None else list(bias.shape))
        ctx.tiles = tiles
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        stride, padding, dilation, groups, bias_sizes = ctx.setting
        if y is not None:
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        if not (wanted[1] and ctx.tiles):
            gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation,
                                                             False, [0, 0], groups, wanted)
            return gx, gw, gb, None, None, None, None, None, None
        # the bias gradient from the same pass (oneDNN's comes with its weight gradient: asking it for
        # the bias alone costs both)
        gx = None
        if wanted[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0],
                                                     groups, [True, False, False])[0]
        gw, gb = conv_weight_grad.weight_grad(grad, x)
        gb = gb.to(grad.dtype) if wanted[2] else None
        return gx, gw.to(weight.dtype), gb, None, None, None, None, None, None


def compute(conv: nn.Conv2d, x: torch.Tensor, relu: bool, tiles: bool) -> torch.Tensor:
    """relu(conv(x)) (or conv(x), relu=False) in one oneDNN call, autocast-aware; the weight gradient on the
    AMX tiles where `tiles` (the routing chose both: routing.py)."""
    weight, bias = conv.weight, conv.bias
    dtype = _dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return ConvReLU.apply(x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                          relu, tiles)


def _dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution computes in: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled("cpu") and x.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return x.dtype
