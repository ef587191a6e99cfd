"""A network's first block, 3x3 conv -> ReLU -> 2x2 max-pool, as one autograd function on the C++
kernels (conv_pool_relu.cpp), for inputs of 1 to 4 channels that need no gradient.

On the d2l preset (1 -> 16 channels at 224x224, batch 128) oneDNN's convolution writes a 16-channel
full-size output that the pool reads, and the backward writes an input gradient of the same size for the
convolution's weight-gradient pass to read again. Here the forward computes each pooled output's
four convolution values in registers and writes only the pooled output and one code byte per
output (max_pool_relu.cpp's); the backward computes the weight and bias gradients from the output
gradient, the codes and the input, and no input gradient. Results equal conv -> ReLU -> pool up to
the convolution's summation order (in bf16, one rounding).

With a training-mode batch norm between the convolution and the ReLU (the fast preset's first
block: 1 -> 32 channels at 28x28), ConvBatchNormPoolReLU computes the batch norm's statistics in
closed form: the output's per-channel mean and variance follow from the input's tap sums and tap
products (conv3x3_input_moments: a 9x9 matrix for a gray input) and the weights. Normalising is
then a convolution with folded weights, so the same forward kernel runs; and since every term of
the batch norm's backward is a sum over pixels of the output gradient, the output or their
product with an input tap, the weight, bias and batch-norm gradients follow from the forward
kernel's backward sums and the same moments. No full-size tensor is written in either direction.

routing.py decides where they run: on gray first layers (tuning.FASTER_IN_CHANNELS; on RGB, oneDNN's
convolution on the matrix units measured faster).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .bn_relu import module_arguments
from .conv_relu import _dtype as compute_dtype

MAX_IN_CHANNELS = 4  # the C++ kernel's (kMaxInChannels): gray and RGB(A) first layers


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


def compute(conv: nn.Conv2d, x: torch.Tensor, backward: bool) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2, 2)) on the kernels, in the dtype autocast would give the convolution;
    with its autograd function where `backward` (the routing chose it: routing.py)."""
    if backward:
        return ConvPoolReLU.apply(x.to(compute_dtype(x)), conv.weight, conv.bias)
    return torch.ops.vggkit.conv_pool_relu(x.to(compute_dtype(x)), conv.weight, conv.bias)[0]


class ConvBatchNormPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum: float, eps: float):
        with torch.autocast("cpu", enabled=False):
            gram, sums = torch.ops.vggkit.conv3x3_input_moments(x)
            count = x.shape[0] * x.shape[2] * x.shape[3]
            w, b = _flat(weight, bias)
            mean_in = sums / count
            mean = w @ mean_in + b
            var = ((w @ (gram / count - torch.outer(mean_in, mean_in))) * w).sum(1).clamp_min(0)
            invstd = (var + eps).rsqrt()
            scale = invstd if bn_weight is None else invstd * bn_weight.double()
            shift = (b - mean) * scale + (0.0 if bn_bias is None else bn_bias.double())
            folded = torch.empty_like(weight, dtype=torch.float32).copy_((w * scale[:, None]).view(weight.shape))
            y, code = torch.ops.vggkit.conv_pool_relu(x, folded, shift.float())
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.float(), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * count / (count - 1)).float(), alpha=momentum)
        ctx.save_for_backward(x, weight, bias, bn_weight, code, folded, gram, sums, mean, invstd, scale)
        ctx.count = count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, bn_weight, code, folded, gram, sums, mean, invstd, scale = ctx.saved_tensors
        count = ctx.count
        # s_x[c, k] = sum of g * x_k and s_1[c] = sum of g, over the positions the pool and ReLU passed
        s_x, s_1 = torch.ops.vggkit.conv_pool_relu_backward(grad, code, x, folded)
        s_x, s_1 = s_x.double().flatten(1), s_1.double()
        w, b = _flat(weight, bias)
        centred = b - mean  # the convolution's output at a pixel, less the batch mean: w . x_k + centred
        grad_bn_weight = invstd * ((w * s_x).sum(1) + centred * s_1)  # sum of g * normalised output
        # sum over every pixel of the normalised output times x_k
        normalised_x = invstd[:, None] * (w @ gram + centred[:, None] * sums)
        grad_weight = scale[:, None] * (s_x - (torch.outer(s_1, sums) + grad_bn_weight[:, None] * normalised_x) / count)
        needs = ctx.needs_input_grad
        return (None, grad_weight.to(weight.dtype).view(weight.shape) if needs[1] else None,
                torch.zeros_like(bias) if needs[2] else None,  # the batch norm takes away any constant
                grad_bn_weight.float() if needs[3] else None, s_1.float() if needs[4] else None,
                None, None, None, None)


def _flat(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight as [C_out, C_in * 9] and its bias (zeros without one), in float64."""
    w = weight.detach().double().flatten(1)
    return w, (torch.zeros(len(w), dtype=torch.float64) if bias is None else bias.detach().double())


def compute_with_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(bn(conv(x)), 2, 2)), bn in training mode, on the kernels (the routing chose
    them: routing.py)."""
    return ConvBatchNormPoolReLU.apply(x.to(compute_dtype(x)), conv.weight, conv.bias, *module_arguments(bn))
