"""`vggkit predict`: top-k classes for image files, preprocessed as the model was trained."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .errors import VggkitError
from .preprocess import Preprocess
from .runtime import pick_device


def load_image(path: str | Path, channels: int) -> torch.Tensor:
    """An image file as a uint8 tensor C x H x W (grayscale or RGB as the model expects)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Image.open(path) as image:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except FileNotFoundError:
        raise VggkitError(f"image {path} does not exist; check the path") from None
    except Image.DecompressionBombError as e:
        raise VggkitError(f"image {path} is too large to open safely ({str(e).rstrip('.')}); "
                          "shrink it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise VggkitError(f"{path} is not a readable image ({type(e).__name__}); give PNG or JPEG files") from None
    for warning in caught:  # Pillow's warnings (a large image, a damaged chunk) do not say which file
        warnings.warn(f"{path}: {warning.message}", warning.category, stacklevel=2)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def model_inputs(images: list[str | Path], meta: dict, device="cpu") -> torch.Tensor:
    """The batch the network sees for these image files: N x C x input_size, normalized."""
    channels = meta["model"]["in_channels"]
    preprocess = Preprocess.from_meta(meta, channels, device)
    return torch.cat([preprocess(load_image(p, channels)[None].to(device)) for p in images])


@torch.no_grad()
def predict_logits(path: str | Path, images: list[str | Path], *, device: str = "auto") -> tuple[torch.Tensor, dict]:
    """(logits N x classes as fp32 on the CPU, the model's metadata) for image files."""
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    return model(model_inputs(images, meta, torch_device)).float().cpu(), meta


def predict(path: str | Path, images: list[str | Path], *, top_k: int = 3, device: str = "auto") -> list[dict]:
    """Top-k (class, probability) for each image file."""
    if top_k < 1:
        raise VggkitError(f"top-k must be at least 1, got {top_k}")
    logits, meta = predict_logits(path, images, device=device)
    probabilities = logits.softmax(1)
    classes = meta["classes"]
    k = min(top_k, len(classes))
    results = []
    for image, probs in zip(images, probabilities):
        top = probs.topk(k)
        results.append({"image": str(image), "top": [{"class": classes[i], "index": int(i), "probability": float(p)}
                                                      for p, i in zip(top.values, top.indices)]})
    return results
