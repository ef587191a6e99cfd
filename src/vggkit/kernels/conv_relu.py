"""relu(conv2d(x)) as one oneDNN convolution with a ReLU post-op, forward and backward, on the CPU.

PyTorch runs the convolution, then the ReLU as a second pass over the output. oneDNN applies the
ReLU as the convolution writes its output (mkldnn::_convolution_pointwise, the op inductor uses);
the backward masks the gradient by the output and calls PyTorch's convolution backward. Results
equal PyTorch's (the same convolution and the same ReLU).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .pool_relu import hooked

DTYPES = (torch.float32, torch.bfloat16)


class ConvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride, dilation, groups):
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, "relu", [], None)
        ctx.save_for_backward(x, weight, y)
        ctx.setting = (stride, padding, dilation, groups, None if bias is None else list(bias.shape))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        stride, padding, dilation, groups, bias_sizes = ctx.setting
        grad = torch.ops.aten.threshold_backward(grad, y, 0)
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation,
                                                         False, [0, 0], groups, wanted)
        return gx, gw, gb, None, None, None, None


def conv_relu_fusable(conv: nn.Module, relu: nn.Module, x: torch.Tensor) -> bool:
    """Whether relu(conv(x)) can run as ConvReLU: a plain 2-D convolution and ReLU without hooks,
    a 4-D float32/bfloat16 CPU input, oneDNN present, outside torch.compile."""
    return (isinstance(conv, nn.Conv2d) and isinstance(relu, nn.ReLU) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and x.device.type == "cpu" and x.dim() == 4
            and _dtype(x) in DTYPES and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling()
            and not hooked(conv, relu))


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)) in one oneDNN call (see conv_relu_fusable), autocast-aware."""
    weight, bias = conv.weight, conv.bias
    dtype = _dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return ConvReLU.apply(x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)


def _dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution computes in: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled("cpu") and x.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return x.dtype
