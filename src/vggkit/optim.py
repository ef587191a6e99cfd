"""Optimizers and learning-rate schedules: one table each, so adding one is one entry.

OPTIMIZERS: name -> how to build it from the parameter groups and the config, and how many state
tensors (each the size of the weights) it keeps, which `vggkit summary`'s memory estimate counts.
SCHEDULES: name -> the learning rate at a point of training, as a pure function of the progress
(so resuming needs only the step count).

torch is imported by the builders, not here: config.py and the CLI read the names without loading it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch


class Settings(Protocol):
    """What this module reads of a config.TrainConfig. config.py reads this module's names (it checks
    --optimizer and --schedule against them), so the module takes the config by these fields only."""
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    backbone_lr: float | None
    schedule: str
    warmup: float


@dataclass(frozen=True)
class OptimizerKind:
    build: Callable[..., torch.optim.Optimizer]  # (param groups, config, **torch options)
    state_tensors: int  # per parameter, each of the parameter's size
    trainable: bool = True  # False: a name only the memory estimate knows


def _sgd(groups: list[dict], config: Settings, linears=(), **options) -> torch.optim.Optimizer:
    """SGD; where the model's Linears take bfloat16 weight copies (`linears`, see copied_linears),
    the SGD that keeps them."""
    from torch.optim import SGD

    from .kernels import SGDWithWeightCopies

    settings = dict(lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
                    **options)
    return SGDWithWeightCopies(groups, list(linears), **settings) if linears else SGD(groups, **settings)


def _adam(groups: list[dict], config: Settings, **options) -> torch.optim.Optimizer:
    from torch.optim import Adam

    return Adam(groups, lr=config.lr, **options)


def _adamw(groups: list[dict], config: Settings, **options) -> torch.optim.Optimizer:
    from torch.optim import AdamW

    return AdamW(groups, lr=config.lr, **options)


OPTIMIZERS: dict[str, OptimizerKind] = {
    "sgd": OptimizerKind(_sgd, state_tensors=0),
    # SGD with --momentum > 0 (training's "sgd") keeps one buffer: the memory estimate names it apart
    "momentum": OptimizerKind(_sgd, state_tensors=1, trainable=False),
    "adam": OptimizerKind(_adam, state_tensors=2),
    "adamw": OptimizerKind(_adamw, state_tensors=2),
}
TRAINING_OPTIMIZERS = tuple(name for name, kind in OPTIMIZERS.items() if kind.trainable)  # --optimizer of train
OPTIMIZER_STATES = {name: kind.state_tensors for name, kind in OPTIMIZERS.items()}  # what cost.summary counts


def state_kind(optimizer: str, momentum: float) -> str:
    """The OPTIMIZERS entry whose state a training optimizer keeps: `sgd` with momentum keeps a buffer."""
    return "momentum" if optimizer == "sgd" and momentum > 0 else optimizer


def make_optimizer(config: Settings, model: torch.nn.Module, world_size: int = 1) -> torch.optim.Optimizer:
    """The config's optimizer over the model's parameters; no weight decay on biases and batch norm.
    With config.backbone_lr other than 1, the feature blocks' groups learn at that fraction of the lr
    ("lr_scale", which set_lr applies). `world_size`: the processes training the model together (DDP)."""
    parts = [(list(model.parameters()), 1.0)]
    if (config.backbone_lr or 1.0) != 1.0:
        features = {id(p) for p in model.features.parameters()}
        parts = [([p for p in model.parameters() if id(p) in features], config.backbone_lr),
                 ([p for p in model.parameters() if id(p) not in features], 1.0)]
    groups = []
    for params, scale in parts:
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale}]
    options = _fused_step(config, model)
    if config.optimizer == "sgd":
        options["linears"] = copied_linears(model, world_size)
    return OPTIMIZERS[config.optimizer].build(groups, config, **options)


def copied_linears(model: torch.nn.Module, world_size: int) -> list:
    """The Linears whose weights SGD steps through bfloat16 copies (kernels.weight_copies): those in
    the "fast" kernels mode, in a single process (under DDP every weight must get its gradient)."""
    from .kernels import copyable_linears

    if world_size > 1:
        return []
    return [m for m in copyable_linears(model) if m.kernels == "fast"]


def _fused_step(config: Settings, model: torch.nn.Module) -> dict:
    """torch.optim's fused step (one kernel over all parameters instead of a loop of ops) on CPU and
    CUDA, unless config.kernels is "plain" (the step as it was); same results."""
    devices = {p.device.type for p in model.parameters()}
    if getattr(config, "kernels", "plain") == "plain" or not devices or not devices <= {"cpu", "cuda"}:
        return {}
    return {"fused": True}


def _constant(config: Settings, progress: float) -> float:
    return config.lr


def _cosine(config: Settings, progress: float) -> float:
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _onecycle(config: Settings, progress: float) -> float:
    """Linear warm-up from lr/10 to lr over the first `warmup` of training, then linear decay to 0."""
    if progress < config.warmup:
        return config.lr * (0.1 + 0.9 * progress / config.warmup)
    return config.lr * (1 - progress) / (1 - config.warmup)


SCHEDULES: dict[str, Callable[[Settings, float], float]] = {
    "none": _constant,
    "cosine": _cosine,
    "onecycle": _onecycle,
}


def lr_at(config: Settings, step: int, total_steps: int) -> float:
    """The learning rate for `step` (0-based) of `total_steps`."""
    progress = min(step / max(1, total_steps), 1.0)
    return SCHEDULES[config.schedule](config, progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
