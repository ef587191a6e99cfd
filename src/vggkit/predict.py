"""`vggkit predict`: top-k classes for image files, preprocessed as the model was trained."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .errors import VggkitError
from .runtime import pick_device


def load_image(path: str | Path, channels: int) -> torch.Tensor:
    """An image file as a float tensor C x H x W in [0, 1] (grayscale or RGB as the model expects)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except FileNotFoundError:
        raise VggkitError(f"image {path} does not exist; check the path") from None
    except (UnidentifiedImageError, OSError) as e:
        raise VggkitError(f"{path} is not a readable image ({type(e).__name__}); give PNG or JPEG files") from None
    tensor = torch.from_numpy(array.copy()).float().div_(255)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def preprocess(image: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Resize (bilinear, as in training) and normalize one C x H x W image."""
    if image.shape[-2:] != (size, size):
        downscale = image.shape[-1] > size or image.shape[-2] > size
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=downscale)[0]
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return (image - mean) / std


@torch.no_grad()
def predict(path: str | Path, images: list[str | Path], *, top_k: int = 3, device: str = "auto") -> list[dict]:
    """Top-k (class, probability) for each image file."""
    if top_k < 1:
        raise VggkitError(f"top-k must be at least 1, got {top_k}")
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    channels = meta["model"]["in_channels"]
    batch = torch.stack([preprocess(load_image(p, channels), meta["input_size"], meta["mean"], meta["std"])
                         for p in images]).to(torch_device)
    probabilities = model(batch).float().softmax(1).cpu()
    classes = meta["classes"]
    k = min(top_k, len(classes))
    results = []
    for image, probs in zip(images, probabilities):
        top = probs.topk(k)
        results.append({"image": str(image), "top": [{"class": classes[i], "index": int(i), "probability": float(p)}
                                                      for p, i in zip(top.values, top.indices)]})
    return results
