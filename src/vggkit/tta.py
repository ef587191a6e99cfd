"""Test-time augmentation (TTA): a model's logits averaged over views of a batch.

A view is a mirror and/or a one-pixel translation of the preprocessed batch (N x C x H x W):

    identity        the batch as it is
    flip            mirrored left-right (only where the data is flip-safe: the run trained with flips)
    shift+1         every image moved one pixel down and right; shift-1: one pixel up and left
    flip shift+1    ... and mirrored; flip shift-1 likewise

The pixels a shift uncovers take the value a black pixel has after preprocessing: training's random
crop pads the stored uint8 images with zeros before normalising (pipeline.py), so a shifted view looks
like a training crop (exactly so where the input size is the images' own, the size decided by default).

The mean is taken over logits, not probabilities: it is itself a logit vector, so the loss, the
confidence and the top-k come from it exactly as from one forward pass. TTA_LEVELS name the sets of
views; a level asking for flips on data that is not flip-safe drops its flipped views (a note, no error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .errors import VggkitError

VIEWS: dict[str, tuple[bool, int]] = {  # name -> (mirrored, shift in pixels along both axes)
    "identity": (False, 0), "flip": (True, 0),
    "shift+1": (False, 1), "shift-1": (False, -1),
    "flip shift+1": (True, 1), "flip shift-1": (True, -1),
}
TTA_LEVELS: dict[str, tuple[str, ...]] = {
    "off": ("identity",),
    "flip": ("identity", "flip"),
    "translate": ("identity", "shift+1", "shift-1"),
    "flip-translate": tuple(VIEWS),
}
STRONGEST = "flip-translate"  # what a bare --tta asks for
WITHOUT_FLIP = {"off": "off", "flip": "off", "translate": "translate", "flip-translate": "translate"}
LABELS = {"off": "none", "flip": "flip", "translate": "translate", "flip-translate": "flip + translate"}


@dataclass(frozen=True)
class TtaPlan:
    level: str  # the level used: the one asked for, without its flips where the data is not flip-safe
    note: str | None = None  # why flips were left out, where the level asked for them

    @property
    def views(self) -> tuple[str, ...]:
        return TTA_LEVELS[self.level]

    @property
    def active(self) -> bool:
        return self.views != TTA_LEVELS["off"]

    def describe(self) -> str:
        """E.g. "flip + translate, 6 views"."""
        count = len(self.views)
        return f"{LABELS[self.level]}, {count} view{'s' if count != 1 else ''}"


def check_level(level) -> str:
    if level not in TTA_LEVELS:
        raise VggkitError(f"unknown TTA level {level!r}; choose {', '.join(TTA_LEVELS)} (a bare --tta: {STRONGEST})")
    return level


def tta_plan(level: str, flip_safe: bool, why_not: str = "the data is not flip-safe") -> TtaPlan:
    """The views of `level` for data that is (or is not) flip-safe; `why_not` ends the note."""
    check_level(level)
    if flip_safe or WITHOUT_FLIP[level] == level:
        return TtaPlan(level)
    return TtaPlan(WITHOUT_FLIP[level], f"TTA: flip views left out ({why_not}); using {WITHOUT_FLIP[level]}")


def flip_safety(trained_with_flip: bool | None, dataset: str | None) -> tuple[bool, str]:
    """(whether flipped views are fair, why not): the run's config.flip; for weights without a run
    config, whether the registry knows their data set as flip-safe."""
    if trained_with_flip is not None:
        return trained_with_flip, "the run trained without flips"
    from .data.registry import REGISTRY

    entry = REGISTRY.get(dataset or "")
    if entry is None:
        return False, "no run config says the data is flip-safe"
    return entry.flips_safe, f"{entry.name} is not flip-safe"


def view(x: torch.Tensor, name: str, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """One view of the batch x (N x C x H x W); `fill` (a number or one per channel) where a shift uncovers pixels."""
    mirrored, shift = VIEWS[name]
    if mirrored:
        x = x.flip(3)
    return _shift(x, shift, fill) if shift else x


def _shift(x: torch.Tensor, s: int, fill: torch.Tensor | float) -> torch.Tensor:
    """x moved s pixels down and s right (up and left for s < 0), the uncovered border set to fill."""
    out = torch.empty_like(x)
    out.copy_(torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand_as(x))
    h, w = x.shape[-2:]
    a, b = max(s, 0), max(-s, 0)
    out[:, :, a:h - b, a:w - b] = x[:, :, b:h - a, b:w - a]
    return out


def tta_logits(model, x: torch.Tensor, views: tuple[str, ...], fill: torch.Tensor | float = 0.0,
               max_images: int | None = None, identity: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of model's logits over the views of x: the views batched together, at most
    max(len(x), max_images) images per forward (default: all of them in one). `identity`: model(x)
    where it is known already, then not computed again."""
    if identity is not None and len(identity) != len(x):
        raise ValueError(f"identity logits for {len(identity)} images given with a batch of {len(x)}")
    if tuple(views) == ("identity",):
        return model(x) if identity is None else identity  # exactly the plain forward
    known = identity is not None and "identity" in views
    computed = tuple(name for name in views if name != "identity") if known else tuple(views)
    per_forward = max(1, (max_images or len(x) * len(computed)) // max(len(x), 1))
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format  # as the loader made x
    total = identity.float() if known else None
    for start in range(0, len(computed), per_forward):
        group = computed[start:start + per_forward]
        batch = torch.cat([view(x, name, fill) for name in group]).contiguous(memory_format=memory_format)
        logits = model(batch).float()
        logits = logits.view(len(group), len(x), logits.shape[-1]).sum(0)
        total = logits if total is None else total + logits
    return total / len(views)


def tta_forward(model, views: tuple[str, ...], fill: torch.Tensor | float = 0.0, max_images: int | None = None,
                identity: Iterable[torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> tta_logits(model, x, views, ...): what steps.evaluate_loader and evaluate run instead of model(x).
    `identity`: model(x) of the batches to come, in their order, where they are known already."""
    known = iter(identity) if identity is not None else None
    return lambda x: tta_logits(model, x, views, fill, max_images, next(known) if known is not None else None)


def run_plan(level: str, trained_with_flip: bool | None, dataset: str | None, log) -> TtaPlan:
    """tta_plan for a run's data (flips only where it trained with them, see flip_safety), the note
    about left-out flips said through `log`."""
    plan = tta_plan(level, *flip_safety(trained_with_flip, dataset))
    if plan.note:
        log(plan.note)
    return plan


def loader_forward(model, plan: TtaPlan, loader,
                   identity: Iterable[torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """tta_forward over the batches of `loader`: shifts fill with its black, at most a batch per forward;
    `identity`: model's logits of the loader's batches, in order, where they are known already."""
    return tta_forward(model, plan.views, black_after_preprocessing(loader), loader.batch_size, identity)


def black_after_preprocessing(loader) -> torch.Tensor:
    """Per channel of the loader's batches, the value of a black (0) pixel after its preprocessing:
    what training's crop padding becomes."""
    black = loader.preprocess.shift.reshape(-1)  # (0/255 - mean) / std
    return black.expand(loader.channels) if len(black) != loader.channels else black
