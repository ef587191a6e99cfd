"""bfloat16 copies of Linear weights that the optimizer step writes (sgd_bf16_copy.cpp).

Training on the CPU under bf16 autocast, a Linear casts its float32 weight to bfloat16 every forward
and casts the weight's bfloat16 gradient back to float32 every backward: two passes over the weight
every step (the d2l preset's classifier has 42 M weights; BENCHMARKS.md has what they cost).
With a copy, the Linear multiplies by a bfloat16 leaf tensor (`WeightCopy.tensor`), autograd leaves
the gradient on it in bfloat16, and SGDWithWeightCopies's step reads that gradient, updates the
float32 weight and its momentum buffer as torch.optim.SGD does and writes the next copy, in one
pass. The copy equals autocast's cast to the bit, so the forward and the gradients are autocast's.

The float32 weight stays the parameter: state dict, checkpoints (the momentum buffer is SGD's own
state), EMA and export see nothing else. The copy is used only where all of this holds (routing.py);
elsewhere the Linear computes as nn.Linear and the optimizer steps the weight as SGD does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD

from . import tuning


class WeightCopy:
    """The bfloat16 copy of one Linear's weight, made at its first use, and the weight's version
    counter when the copy was written: a weight changed since (loaded, averaged in) is copied again."""

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.version = -1

    def current(self, weight: torch.Tensor) -> torch.Tensor:
        if self.tensor is None or self.tensor.shape != weight.shape:
            self.tensor = torch.empty(weight.shape, dtype=torch.bfloat16, device=weight.device).requires_grad_()
            self.version = -1
        if self.version != weight._version:
            with torch.no_grad():
                self.tensor.copy_(weight)
            self.version = weight._version
        return self.tensor

    def __deepcopy__(self, memo):  # a copied model (an EMA's) starts without one
        return WeightCopy()


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) with the bfloat16 copy of its weight (the routing chose it: routing.py), in bfloat16 as
    autocast computes it."""
    bias = None if module.bias is None else module.bias.to(torch.bfloat16)
    return LinearOnCopy.apply(x.to(torch.bfloat16), module.weight_copy.current(module.weight), bias)


class LinearOnCopy(torch.autograd.Function):
    """F.linear on bfloat16 tensors whose weight gradient multiplies a contiguous transpose of the
    output gradient (faster than autograd's go.t() @ x on the d2l preset's first classifier layer);
    the same products otherwise."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        inputs = x.reshape(-1, x.shape[-1])
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_weight = rows.t().contiguous().mm(inputs) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class SGDWithWeightCopies(SGD):
    """torch.optim.SGD that also steps the weights of `linears` through their bfloat16 copies.

    It gives each Linear a WeightCopy; after a backward in which a Linear used it, the weight has no
    gradient and the copy has one, and the step updates that weight with the C++ kernel (same
    arithmetic as SGD, momentum buffer in SGD's state). Every other parameter, and a weight whose
    Linear computed without the copy, goes through SGD's own step.
    """

    def __init__(self, params, linears: list[nn.Module], **options):
        super().__init__(params, **options)
        self.copies = {}
        for module in linears:
            module.weight_copy = WeightCopy()
            self.copies[module.weight] = module.weight_copy

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for weight in group["params"]:
                copy = self.copies.get(weight)
                if copy is None or copy.tensor is None or copy.tensor.grad is None or weight.grad is not None:
                    continue
                self._step_through_copy(weight, copy, group)
        super().step()
        return loss

    def _step_through_copy(self, weight: torch.Tensor, copy: WeightCopy, group: dict) -> None:
        momentum, buffer, first = group["momentum"], weight.new_empty(0), False
        if momentum != 0:  # SGD's state, as SGD keeps it: only with momentum
            state = self.state[weight]
            first = state.get("momentum_buffer") is None
            if first:
                state["momentum_buffer"] = torch.empty_like(weight, memory_format=torch.contiguous_format)
            buffer = state["momentum_buffer"]
        torch.ops.vggkit.sgd_step_bf16_copy(weight, buffer, copy.tensor.grad, copy.tensor.detach(), float(group["lr"]),
                                            group["weight_decay"], momentum, group["dampening"], group["nesterov"],
                                            first)
        copy.tensor.grad = None
        copy.version = weight._version

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for copy in self.copies.values():
            if copy.tensor is not None:
                copy.tensor.grad = None


def copyable_linears(model: nn.Module) -> list[nn.Module]:
    """The Linears of `model` that can take a copy: an nn.Linear that declares a `weight_copy` slot
    (vggkit's model.Linear: it multiplies by the copy) with a trainable float32 weight on the CPU, large
    enough for the copy to pay (tuning.MIN_COPY_WEIGHTS)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, "weight_copy")
            and m.weight.requires_grad and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
            and m.weight.numel() >= tuning.MIN_COPY_WEIGHTS.value]
