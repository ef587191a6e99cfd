"""The one preprocessing of images before the network, for training, evaluation, predict and export.

uint8 N x C x H x W -> float -> normalize ((x/255 - mean)/std, per channel) -> resize to the
input size: bilinear, align_corners=False (pixel centres), antialiased when shrinking. Normalizing
first is exact (bilinear weights sum to 1, with or without antialiasing) and cheaper when the
stored images are smaller than the input. The same resize is PIL's Image.resize(..., BILINEAR)
on float ("F" mode) images, which is how the README's onnxruntime snippet reproduces it.

The interpolation is recorded in checkpoint metadata (preprocess_meta) and in exported models, so
a file says how to feed it; metadata without it (older checkpoints) means this one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import VggkitError

INTERPOLATION = "bilinear"
ANTIALIAS = "when shrinking"


def preprocess_meta() -> dict:
    """The interpolation keys to store with a model's metadata (train.py merges them into meta)."""
    return {"interpolation": INTERPOLATION, "antialias": ANTIALIAS, "align_corners": False}


def interpolation_of(meta: dict) -> dict:
    """The interpolation keys of a model's metadata (defaults where missing); unknown values are an error."""
    stored = {key: meta.get(key, value) for key, value in preprocess_meta().items()}
    if stored != preprocess_meta():
        raise VggkitError(f"the model was trained with a resize this vggkit does not know ({stored}); "
                          "use the vggkit version that trained it")
    return stored


def settings_from_meta(meta: dict) -> dict:
    """input_size, mean and std of a model's metadata, as Preprocess and BatchLoader take them."""
    interpolation_of(meta)
    return {"input_size": meta["input_size"], "mean": meta["mean"], "std": meta["std"]}


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C x H x W float images to size (height, width): bilinear, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    # antialias only when shrinking: upscaling (28 -> 224) stays the plain kernel it always was
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


class Preprocess:
    """uint8 N x C x H x W images -> normalized float32 N x C x input_size, on `device`."""

    def __init__(self, input_size, mean, std, channels: int, device="cpu"):
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or min(size) < 1:
            raise VggkitError(f"input size must be a positive integer, got {input_size!r}")
        self.size, self.channels = size, channels
        mean_t, std_t = (_per_channel(name, v, channels) for name, v in (("mean", mean), ("std", std)))
        if (std_t <= 0).any():
            raise VggkitError(f"std must be positive, got {tuple(std)}")
        # (x/255 - mean)/std == x*scale + shift: one multiply-add pass
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)

    @classmethod
    def from_meta(cls, meta: dict, channels: int, device="cpu") -> "Preprocess":
        """The preprocessing a model was trained with, from its checkpoint metadata."""
        return cls(**settings_from_meta(meta), channels=channels, device=device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32, copy=True).mul_(self.scale).add_(self.shift)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return resize(self.normalize(images), self.size)


def _per_channel(name: str, values, channels: int) -> torch.Tensor:
    values = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else (values,)))
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        need = "1 value" if channels == 1 else f"1 or {channels} values"  # not "1 or 1"
        raise VggkitError(f"{name} has {len(values)} values for {channels}-channel images; it takes {need}")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)
