"""Image files as they are: every Pillow mode to 8-bit gray or RGB pixels, and fitted to a size.

Conversion (pixels_of), the one place that decides what a file's pixels are, for training
folders, evaluation and predict alike:
- the EXIF orientation is applied (a phone photo stands as it is shown);
- 16-bit gray (I;16*) is scaled to 8 bits (v / 257, rounded) instead of saturating at 255;
  32-bit integer images (I) are read as 16-bit, which they are when they come from 16-bit files;
  float images (F) are taken as 0..1 when no value exceeds 1 (the float-image convention),
  else as 0..255 (Pillow's), and clipped;
- transparency (LA, RGBA, PA, a transparent palette entry or colour) is composited on WHITE: what a
  browser or viewer shows on a page, and what cut-out product photos, icons and scanned text are
  drawn for (black would swallow dark strokes on a transparent background);
- palette images whose colours are all gray count as grayscale; CMYK, YCbCr, LAB, HSV -> RGB.

Fitting (fit): an image of another size is centre-cropped to the aspect ratio of the target size,
then resized to it (PIL bilinear on the 8-bit image, which averages when shrinking). Centre-crop
rather than letterbox: the network sees real pixels at the same scale whatever the aspect ratio,
and never learns from bars whose width tells the aspect ratio (which can leak a class, e.g.
portrait photos of one class); the cost, a strip cut off the long side, is the choice of the
standard ImageNet evaluation too. A file's pixels are only resampled when its size differs.

Decompression bombs: an image over Pillow's MAX_IMAGE_PIXELS is refused (ImageTooLarge) before
it is decoded, where Pillow itself would only warn.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from ..special_files import refuse_special

# Extensions looked for in folders (any file named on a command line is tried with Pillow).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_KINDS = "PNG/JPEG/BMP/WebP/TIFF"
FIT = "center-crop"  # how an image of another size is brought to the stored size (recorded in model metadata)
BACKGROUND = 255  # transparency is composited on white
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageTooLarge(VggkitError):
    """An image over Pillow's decompression-bomb limit."""


def image_files(directory: Path, recursive: bool = False) -> list[Path]:
    """The image files in a folder (by extension, hidden files, special files and hidden folders skipped),
    sorted by path."""
    if not recursive:  # scandir: file types from the directory listing, sorted as strings
        with os.scandir(directory) as entries:
            names = sorted(e.name for e in entries if _is_image_name(e.name) and e.is_file())
        return [directory / name for name in names]
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent) / f for f in files if _is_image_name(f) and os.path.isfile(os.path.join(parent, f))]
    return sorted(found)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTS)


def max_image_pixels() -> int:
    """The most pixels an image vggkit reads may have: Pillow's MAX_IMAGE_PIXELS (open_image refuses more)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or 2**32


def open_image(path: str | Path):
    """The PIL image at path, header read only; ImageTooLarge over Pillow's decompression-bomb limit."""
    from PIL import Image

    refuse_special(path, "image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            size = str(e).split(", could")[0]  # "Image size (N pixels) exceeds limit of M pixels"
            raise ImageTooLarge(f"{path} is too large ({size}: Pillow's guard against decompression bombs); "
                                "shrink or remove it") from None


def reduce_on_decode(image, size: tuple[int, int]) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode: DCT-domain downscaling) where its
    centre crop for size (h, w) stays at least that large; other formats are left to decode whole."""
    if image.format != "JPEG":
        return
    w, h = image.size
    scale = max(size) / min(w, h)
    image.draft(image.mode, (int(np.ceil(w * scale)), int(np.ceil(h * scale))))


def natural_channels(image) -> int:
    """1 for images that are grayscale (by mode, or a palette of grays), else 3; from the header only."""
    if image.mode in _GRAY_MODES:
        return 1
    if image.mode in ("P", "PA"):
        return 1 if _gray_palette(image) else 3
    return 3


def shown_size(image) -> tuple[int, int]:
    """(height, width) as the image is shown, after its EXIF orientation."""
    w, h = image.size
    return (w, h) if _orientation(image) in _ROTATED else (h, w)


def pixels_of(image, channels: int | None = None) -> np.ndarray:
    """uint8 H x W x C pixels of a PIL image (see the module docstring); C = channels, or the image's own."""
    from PIL import ImageOps

    image.load()
    if _orientation(image) not in (None, 1):
        image = ImageOps.exif_transpose(image)
    array = _eight_bit(image)
    return to_channels(array, channels or array.shape[2])


def read_pixels(path: str | Path, channels: int | None = None) -> np.ndarray:
    """uint8 H x W x C pixels of an image file; Pillow's errors (OSError, ...) and ImageTooLarge propagate."""
    with open_image(path) as image:
        return pixels_of(image, channels)


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """H x W x C uint8 with C = channels: gray replicated to RGB, RGB to gray as Pillow's convert("L") does."""
    from PIL import Image

    if array.shape[2] == channels:
        return array
    if channels == 3:
        return np.repeat(array, 3, axis=2)
    return np.asarray(Image.fromarray(array).convert("L"))[..., None]


def crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): the centred crop of a height x width image at the aspect ratio of size (h, w)."""
    scale = min(width / size[1], height / size[0])
    crop_w, crop_h = min(width, round(size[1] * scale)), min(height, round(size[0] * scale))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def fit(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x C uint8 pixels at size (h, w): centre crop to its aspect ratio, then PIL bilinear resize."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if array.shape[:2] == (h, w):
        return array
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    # crop, then resize: resize(box=...) would blend in pixels from beyond the box
    cropped = image.crop(crop_box(array.shape[0], array.shape[1], (h, w)))
    return np.asarray(cropped.resize((w, h), Image.BILINEAR), dtype=np.uint8).reshape(h, w, -1)


def _orientation(image) -> int | None:
    if image.format == "PNG" and image.tile and "exif" not in image.info:
        # not decoded yet (shown_size): Pillow would decode it all to look for an EXIF chunk after the
        # pixels; such a rare file is then measured unturned, and pixels_of still turns it
        return None
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: show the image as stored
        return None


def _gray_palette(image) -> bool:
    palette = image.getpalette() or []
    rgb = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def _eight_bit(image) -> np.ndarray:
    """H x W x (1 or 3) uint8: the conversions of the module docstring, before any channel change."""
    mode = image.mode
    if mode.startswith("I"):
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return ((wide + 128) // 257).astype(np.uint8)[..., None]
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if np.nanmax(values, initial=0.0) <= 1.0:
            values = values * 255
        return np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)[..., None]
    if mode in ("P", "PA"):
        gray = _gray_palette(image)
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert(("LA" if gray else "RGBA") if has_alpha else ("L" if gray else "RGB"))
        mode = image.mode
    elif mode in ("L", "RGB") and "transparency" in image.info:  # one colour marked transparent (tRNS)
        image = image.convert("LA" if mode == "L" else "RGBA")
        mode = image.mode
    if mode in ("LA", "La", "RGBA", "RGBa"):
        return _on_background(np.asarray(image.convert("LA" if mode.startswith("L") else "RGBA")))
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def _on_background(array: np.ndarray) -> np.ndarray:
    """Straight-alpha pixels (last channel alpha) composited on BACKGROUND, rounded."""
    color, alpha = array[..., :-1].astype(np.uint32), array[..., -1:].astype(np.uint32)
    return ((color * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)
