"""The one preprocessing of images before the network, for training, evaluation, predict and export.

An image file of another size than the training images is first fitted to their stored size,
`image_size` (data/image.py: centre crop to its aspect ratio, then bilinear resize of the 8-bit
image), as the image folder loader fits mixed sizes; then, here:
uint8 N x C x H x W -> float -> normalize ((x/255 - mean)/std, per channel) -> resize to the
input size: bilinear, align_corners=False (pixel centres), antialiased when shrinking. Normalizing
first is exact (bilinear weights sum to 1, with or without antialiasing) and cheaper when the
stored images are smaller than the input. The same resize is PIL's Image.resize(..., BILINEAR)
on float ("F" mode) images, which is how the README's onnxruntime snippet reproduces it.

Photos (image folders of camera-size images, streamed from a prepared cache: data/prepared.py) are
stored at storage_size(input_size) square, 256 for 224, and cut to the input by a centre crop
instead of a resize ("crop": "center" in the metadata): torchvision's ImageNet evaluation (resize
the shorter side to 256, centre crop 224), which ImageNet weights were measured with. Training
takes random-resized crops of the same stored images (stream.py).

All of it is recorded in checkpoint metadata (preprocess_meta) and in exported models, so a file
says how to feed it. Metadata without "resize" (older checkpoints) means "plain": no fit, every
image straight to the input size, its aspect ratio not kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.image import FIT
from .errors import VggkitError

INTERPOLATION = "bilinear"
ANTIALIAS = "when shrinking"
_INTERPOLATION = {"interpolation": INTERPOLATION, "antialias": ANTIALIAS, "align_corners": False}
PLAIN = "plain"  # what metadata without "resize" means: no fit, straight to the input size
RESIZES = (FIT, PLAIN)
CENTER = "center"  # "crop": the input is cut from the middle of the stored image rather than resized
CROP_FRACTION = 0.875  # input / stored side of photos: torchvision's 224 of 256


def storage_size(input_size: int) -> int:
    """The side photos are stored at for an input of input_size: the centre crop takes CROP_FRACTION of it."""
    return round(input_size / CROP_FRACTION)


def preprocess_meta(image_size: tuple[int, int] | None = None, crop: str | None = None) -> dict:
    """The preprocessing keys to store with a model's metadata (trainer.py merges them into meta).

    image_size: (height, width) of the training images as stored (DataSplits.image_size); other
    images are fitted to it. Without it, images are fitted to the input size.
    crop: CENTER where the input is the centre of the stored image (photos), None: resized to it.
    """
    meta = {**_INTERPOLATION, "resize": FIT}
    if image_size is not None:
        meta["image_size"] = [int(n) for n in image_size]
    if crop is not None:
        meta["crop"] = crop
    return meta


def interpolation_of(meta: dict) -> dict:
    """The resampling a model's metadata records: interpolation, resize and (for a fit) image_size,
    each with what its absence meant before it was recorded; unknown values are an error."""
    interpolation = {key: meta.get(key, value) for key, value in _INTERPOLATION.items()}
    stored = interpolation | {"resize": meta.get("resize", PLAIN)}
    if interpolation != _INTERPOLATION or stored["resize"] not in RESIZES:
        raise VggkitError(f"the model was trained with a resize this vggkit does not know ({stored}); "
                          "use the vggkit version that trained it")
    size = meta.get("image_size", meta.get("input_size"))
    if stored["resize"] == FIT and size is not None:
        stored["image_size"] = list(_pair(size))
    if "crop" in meta:
        if meta["crop"] != CENTER:
            raise VggkitError(f"the model was trained with a crop this vggkit does not know ({meta['crop']!r}); "
                              "use the vggkit version that trained it")
        stored["crop"] = CENTER
    return stored


def fit_size(meta: dict) -> tuple[int, int] | None:
    """(height, width) images are fitted to before the preprocessing (image.fit), or None: not fitted."""
    size = interpolation_of(meta).get("image_size")
    return None if size is None else tuple(size)


def settings_from_meta(meta: dict) -> dict:
    """input_size, mean, std and crop of a model's metadata, as Preprocess and BatchLoader take them."""
    crop = interpolation_of(meta).get("crop")
    return {"input_size": meta["input_size"], "mean": meta["mean"], "std": meta["std"], "crop": crop}


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(n) for n in size)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C x H x W float images to size (height, width): bilinear, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    # antialias only when shrinking: upscaling (28 -> 224) stays the plain kernel it always was
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The size (height, width) window in the middle of N x C x H x W images (as large as they allow)."""
    h, w = min(size[0], x.shape[-2]), min(size[1], x.shape[-1])
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


class Preprocess:
    """uint8 N x C x H x W images -> normalized float32 N x C x input_size, on `device`.

    crop=CENTER: images larger than the input are centre-cropped to it (photos), not resized."""

    def __init__(self, input_size, mean, std, channels: int, device="cpu", crop: str | None = None):
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or min(size) < 1:
            raise VggkitError(f"input size must be a positive integer, got {input_size!r}")
        self.size, self.channels, self.crop = size, channels, crop
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
        if self.crop == CENTER:
            images = center_crop(images, self.size)  # uint8: cropped before the float copy
        return resize(self.normalize(images), self.size)


def _per_channel(name: str, values, channels: int) -> torch.Tensor:
    values = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else (values,)))
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        need = "1 value" if channels == 1 else f"1 or {channels} values"  # not "1 or 1"
        raise VggkitError(f"{name} has {len(values)} values for {channels}-channel images; it takes {need}")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)
