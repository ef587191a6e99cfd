"""`vggkit explain`: Grad-CAM heatmaps, where in an image the evidence for a class lies.

Each image goes through predict's preprocessing (load_image, the fit to the stored size, the
centre crop of photo models, normalisation and resize: one owner, predict.py and preprocess.py);
the heatmap (the gradient-weighted activations of a block, ReLU'd, scaled to [0, 1]) is then laid
back over the region of the original image that the network saw, at the image's own size: zero
outside that region (the margins a fit or a centre crop cut away).

Grad-CAM is captum's LayerGradCam: a well-kept implementation whose only requirements (torch,
numpy, matplotlib, tqdm, packaging) vggkit already has; pytorch-grad-cam would bring torchvision,
OpenCV, scipy, scikit-learn and ttach for the same few lines.

The network runs in the "plain" kernels mode (model.set_kernels) while it explains: every layer in
order, with PyTorch's own backward, so the hooked block output is exactly the standard layout's;
the mode the caller had is put back after. The probabilities are those of the same forward pass.

    from vggkit.explain import Explainer, overlay

    explainer = Explainer.from_run("runs/fashion")
    found = explainer.explain(["shoe.png"])          # [Explanation], predicted class, last block
    overlay(found[0]).save("shoe-gradcam.png")       # a PIL image: the heatmap over the image
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import make_folder
from .checkpoint import load_model
from .data.image import crop_box, to_channels
from .errors import VggkitError
from .features import named_layers
from .model import KERNELS, set_kernels
from .plots import pyplot, write_png
from .predict import _fitted, _reduced_for, image_paths, load_image
from .preprocess import CENTER, Preprocess, fit_size, interpolation_of

TOP_K = 5
MIN_SIDE = 256  # PNGs of smaller images are enlarged (nearest neighbour) to this, so the title fits
ALPHA = 0.5  # the heatmap's weight over the image


@dataclass
class Explanation:
    """One image explained: its pixels (H x W x C uint8, as decoded), the heatmap over them (H x W float
    in [0, 1], zero outside `region`), the class explained with its probability, and the top classes."""
    image: str
    pixels: np.ndarray
    heatmap: np.ndarray
    region: tuple[int, int, int, int]  # (left, top, right, bottom) of pixels: what the network saw
    target: str
    index: int
    probability: float
    top: list[dict]
    layer: str

    @property
    def title(self) -> str:
        return f"{self.target} {self.probability:.1%}"


class Explainer:
    """Grad-CAM for a loaded model and its checkpoint metadata (checkpoint.load_model); layer: a block
    name "blockN" (default: the last block) or a convolution or batch norm inside one ("block3.conv2")."""

    def __init__(self, model: torch.nn.Module, meta: dict, layer: str | None = None):
        from captum.attr import LayerGradCam

        self.model, self.meta = model, meta
        self.classes = meta["classes"]
        layers = {name: module for name, module in named_layers(model) if ".relu" not in name}
        self.layer = layer or f"block{len(model.features)}"
        if self.layer not in layers:
            blocks = [name for name in layers if "." not in name]
            raise VggkitError(f"unknown layer {self.layer!r}; give a block ({', '.join(blocks)}) or a conv or "
                              f"batch norm inside one, e.g. {blocks[-1]}.conv1")
        # the ReLUs run in place, so they are not offered; a conv they follow directly is seen after its ReLU
        self._grad_cam = LayerGradCam(model, layers[self.layer])
        self.device = next(model.parameters()).device
        self.channels = meta["model"]["in_channels"]
        self.preprocess = Preprocess.from_meta(meta, self.channels, self.device)
        self.size = fit_size(meta)
        self.reduced = _reduced_for(meta, self.size)
        self.crop = interpolation_of(meta).get("crop")

    @classmethod
    def from_run(cls, path: str | Path, layer: str | None = None, averaged: bool = True,
                 device: str = "cpu") -> Explainer:
        """The model stored at `path` (run dir, checkpoint dir or weights file); averaged: its EMA weights if any."""
        model, meta = load_model(path, device, averaged=averaged)
        return cls(model.eval(), meta, layer)

    @classmethod
    def of(cls, source, layer: str | None = None, averaged: bool = True, device: str = "cpu") -> Explainer:
        """For a run (its path: from_run) or a (model, meta) pair."""
        if isinstance(source, tuple):
            return cls(*source, layer)
        return cls.from_run(source, layer, averaged=averaged, device=device)

    def explain(self, images: Iterable, target: str | int | None = None, top_k: int = TOP_K) -> list[Explanation]:
        """One Explanation per image: a file path, a binary file object with a `name` (an upload), or
        H x W x C uint8 pixels (Dataset.pixels); folders give their images. target: a class name or
        index to explain (default: each image's predicted class)."""
        wanted = None if target is None else self.class_index(target)
        return [self._explain_one(source, wanted, top_k) for source in self._sources(images)]

    def class_index(self, target: str | int) -> int:
        if isinstance(target, str) and target in self.classes:
            return self.classes.index(target)
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            if 0 <= int(target) < len(self.classes):
                return int(target)
        shown = ", ".join(self.classes[:20]) + (", ..." if len(self.classes) > 20 else "")
        raise VggkitError(f"unknown class {target!r}; give a class name ({shown}) or an index below "
                          f"{len(self.classes)}")

    def _sources(self, images) -> list:
        if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "read"):
            images = [images]
        sources = []
        for item in images:  # files and folders as predict takes them; missing ones said
            sources += image_paths([item]) if isinstance(item, (str, Path)) else [item]
        return sources

    def _explain_one(self, source, wanted: int | None, top_k: int) -> Explanation:
        pixels, name = self._pixels(source)
        x = self.preprocess(_fitted(pixels, self.size)[None].to(self.device))
        with plain_kernels(self.model), torch.enable_grad():
            logits = self.model(x).float()
            index = int(logits.argmax(1)) if wanted is None else wanted
            cam = self._grad_cam.attribute(x, target=index, relu_attributions=True)
        probabilities = logits.detach().softmax(1)[0].cpu()
        top = probabilities.topk(min(top_k, len(self.classes)))
        pixels = self._at_own_size(source, pixels)
        region = self.seen_region(tuple(pixels.shape[1:]))
        array = pixels.permute(1, 2, 0).numpy()
        return Explanation(
            image=name, pixels=array, heatmap=place(cam.detach()[0, 0].float().cpu(), region, array.shape[:2]),
            region=region, target=self.classes[index], index=index, probability=float(probabilities[index]),
            top=[{"class": self.classes[i], "index": i, "probability": p}
                 for p, i in zip(top.values.tolist(), top.indices.tolist())],
            layer=self.layer)

    def _pixels(self, source) -> tuple[torch.Tensor, str]:
        """(C x H x W uint8 in the model's channels, a name for the image)."""
        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8 or source.ndim != 3:
                raise VggkitError(f"pixels must be H x W x C uint8, got {source.dtype} {source.shape}")
            return torch.from_numpy(to_channels(source, self.channels).copy()).permute(2, 0, 1), "pixels"
        name = str(getattr(source, "name", "the image")) if hasattr(source, "read") else str(source)
        return load_image(source, self.channels, self.reduced), name

    def _at_own_size(self, source, pixels: torch.Tensor) -> torch.Tensor:
        """The image at its own size for the heatmap: a photo model's JPEGs were decoded reduced for the
        network, as its prepared cache decoded them (the region the network saw scales with the image)."""
        if self.reduced is None or isinstance(source, np.ndarray):
            return pixels
        if hasattr(source, "seek"):
            source.seek(0)
        return load_image(source, self.channels)

    def seen_region(self, shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of an image of shape (H, W) that the network's input covers: the
        fit's centre crop to the stored aspect ratio, then, for photo models, the centre crop to the input."""
        height, width = shape
        left, top, right, bottom = (0, 0, width, height) if self.size is None else crop_box(height, width, self.size)
        stored_h, stored_w = self.size or (height, width)
        sx, sy = (right - left) / stored_w, (bottom - top) / stored_h
        if self.crop == CENTER:  # as preprocess.center_crop cuts it, in stored pixels
            crop_h, crop_w = min(self.preprocess.size[0], stored_h), min(self.preprocess.size[1], stored_w)
            y0, x0 = (stored_h - crop_h) // 2, (stored_w - crop_w) // 2
            left, top, right, bottom = left + x0 * sx, top + y0 * sy, left + (x0 + crop_w) * sx, top + (y0 + crop_h) * sy
        return round(left), round(top), round(right), round(bottom)


def explain(source, images: Iterable, *, target: str | int | None = None, layer: str | None = None,
            top_k: int = TOP_K, averaged: bool = True, device: str = "cpu") -> list[Explanation]:
    """Grad-CAM of `images` for a run (its path) or a (model, meta) pair: see Explainer.explain."""
    return Explainer.of(source, layer, averaged, device).explain(images, target, top_k)


@contextlib.contextmanager
def plain_kernels(model: torch.nn.Module):
    """The model in the "plain" kernels mode for the block; each module's mode put back after."""
    modes = {module: module.kernels for module in model.modules()
             if isinstance(getattr(module, "kernels", None), str) and module.kernels in KERNELS}
    set_kernels(model, "plain")
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.kernels = mode


def place(cam: torch.Tensor, region: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """The feature-map heatmap resized onto `region` of an image of `shape`, scaled to [0, 1], zero elsewhere."""
    left, top, right, bottom = region
    out = np.zeros(shape, dtype=np.float32)
    if right <= left or bottom <= top:
        return out
    resized = F.interpolate(cam[None, None], size=(bottom - top, right - left), mode="bilinear",
                            align_corners=False)[0, 0].clamp_(min=0)
    peak = float(resized.max())
    out[top:bottom, left:right] = (resized / peak).numpy() if peak > 0 else 0
    return out


def overlay(explanation: Explanation, alpha: float = ALPHA, min_side: int = 0):
    """A PIL RGB image: the heatmap (matplotlib's "jet") blended over the image where the network looked;
    the margins it did not see are dimmed. min_side: enlarge (nearest neighbour) to at least that side."""
    from matplotlib import colormaps
    from PIL import Image

    image = to_channels(explanation.pixels, 3).astype(np.float32)
    heat = colormaps["jet"](explanation.heatmap)[..., :3] * 255
    seen = np.zeros(explanation.heatmap.shape, dtype=bool)
    left, top, right, bottom = explanation.region
    seen[top:bottom, left:right] = True
    blended = np.where(seen[..., None], (1 - alpha) * image + alpha * heat, 0.4 * image)
    result = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    scale = math.ceil(min_side / min(result.size)) if min_side and min(result.size) < min_side else 1
    return result.resize((result.width * scale, result.height * scale), Image.NEAREST) if scale > 1 else result


def save_png(explanation: Explanation, path: str | Path) -> Path:
    """The overlay at the image's own size (small images enlarged to MIN_SIDE), titled with the class and
    its probability, written atomically."""
    plt = pyplot()
    picture = overlay(explanation, min_side=MIN_SIDE)
    dpi, title_px = 100, 40
    fig = plt.figure(figsize=(picture.width / dpi, (picture.height + title_px) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, picture.height / (picture.height + title_px)))
    ax.imshow(picture, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(f"{explanation.title} ({explanation.layer})", y=1 - 4 / (picture.height + title_px), va="top",
                 fontsize=11)
    return write_png(fig, path, dpi=dpi)


def write_pngs(explanations: Sequence[Explanation], out_dir: str | Path) -> list[Path]:
    """One <image name>.gradcam.png per explanation in out_dir (made if missing; repeated names numbered)."""
    out_dir = make_folder(Path(out_dir))
    written, used = [], set()
    for explanation in explanations:
        stem = Path(explanation.image).stem or "image"
        name, n = f"{stem}.gradcam.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.gradcam.png"
        used.add(name)
        written.append(save_png(explanation, out_dir / name))
    return written
