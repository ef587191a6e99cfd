"""Weight averaging (EMA): an fp32 running average of the weights, what a run evaluates and saves
beside the raw weights when `--ema DECAY` is on.

    ema = EMA(model, decay=0.999, every=1)
    ema.update(model, step)        # after each optimizer step that was taken (step: steps done, from 1)
    ema.module                     # a copy of the network holding the averaged weights, in eval mode

The shadow is the unwrapped network's state dict (DDP's .module, torch.compile's _orig_mod taken
off), so its keys are a checkpoint's. Every floating tensor (parameters and batch-norm statistics)
is moved toward the model's in one fused call (torch._foreach_lerp_); integer buffers
(num_batches_tracked) are copied. The decay starts low, min(decay, (1 + step) / (10 + step)), so
the average is not stuck at the initial weights; updating every k steps raises it to the k-th
power, the weight k single updates would leave on the old average.
"""
from __future__ import annotations

import copy

import torch

from .errors import VggkitError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network under DistributedDataParallel and torch.compile wrappers (in any order)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class EMA:
    """An exponential moving average of a model's weights (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1):
        if not 0 <= decay < 1:
            raise VggkitError(f"the EMA decay must be in [0, 1), got {decay!r}; e.g. 0.999")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise VggkitError(f"the EMA must be updated every 1 or more steps, got {every!r}; e.g. 1")
        self.decay, self.every = decay, every
        self.module = copy.deepcopy(unwrap(model)).float().eval().requires_grad_(False)
        shadow = self.module.state_dict()  # these tensors share the copy's storage: updating them updates it
        self._averaged_keys = [key for key, value in shadow.items() if value.is_floating_point()]
        self._copied_keys = [key for key, value in shadow.items() if not value.is_floating_point()]
        self._averaged = [shadow[key] for key in self._averaged_keys]
        self._copied = [shadow[key] for key in self._copied_keys]

    def decay_at(self, step: int) -> float:
        """The decay of one update at `step`, before the k-th power of `every`: low at first (warm-up)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Move the average toward `model`'s weights, at every `every`-th step (`step` counts from 1)."""
        if step % self.every:
            return
        weights = unwrap(model).state_dict()
        decay = self.decay_at(step) ** self.every
        torch._foreach_lerp_(self._averaged, [weights[key].float() for key in self._averaged_keys], 1.0 - decay)
        if self._copied:
            torch._foreach_copy_(self._copied, [weights[key] for key in self._copied_keys])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, under the network's state-dict keys."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)  # copies into the shadow's tensors: they stay the ones updated

    def settings(self) -> dict:
        """What a checkpoint's metadata records under "ema"."""
        return {"decay": self.decay, "every": self.every}

    def describe(self) -> str:
        """For the run's header line."""
        steps = "step" if self.every == 1 else f"{self.every} steps"
        return f"ema: decay {self.decay:g}, every {steps}; evaluated with the averaged weights"
