"""`vggkit predict`: top-k classes for image files and folders, preprocessed as the model was trained.

Each image is read as training images are (data/image.py), fitted to the size the training images
were stored at (centre crop + resize, preprocess.fit_size; nothing for models from before it was
recorded), then normalized and resized to the input (preprocess.Preprocess). Images go through the
network batch_size at a time, so memory stays bounded however many there are; results come out in
order as they are ready (iter_predictions), for text, JSON or a CSV file (write_csv).
"""
from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .atomic import ENCODING, ENCODING_ERRORS, atomic_write
from .checkpoint import load_model
from .data.image import IMAGE_KINDS, fit, image_files, pixels_of, reduce_on_decode
from .errors import VggkitError
from .preprocess import CENTER, Preprocess, fit_size, interpolation_of
from .inference import InferenceRunner, check_policy
from .runtime import Speed, pick_device
from .special_files import refuse_special
from .untrusted import csv_cell, printable

BATCH_SIZE = 256
SPEED = Speed(amp_dtype=None, channels_last=False, compile=False)  # predictions run in float32, NCHW


def load_image(path: str | Path, channels: int, reduced_for: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as a uint8 tensor C x H x W (grayscale or RGB as the model expects).
    reduced_for (h, w): decoded as the prepared cache decodes photos for that size (image.reduce_on_decode).
    path may also be a binary file object (an upload held in memory); messages name it by its `name`."""
    from PIL import Image, UnidentifiedImageError

    if hasattr(path, "read"):
        source, path = path, getattr(path, "name", "the image")
    else:
        source = refuse_special(path, "image")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Image.open(source) as image:
                if reduced_for is not None:
                    reduce_on_decode(image, reduced_for)
                array = pixels_of(image, channels)
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


def image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, each folder replaced by its image files (recursively, sorted by path)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = image_files(item, recursive=True)
            if not found:
                raise VggkitError(f"{item} holds no {IMAGE_KINDS} images (searched recursively); give another folder")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise VggkitError(f"image {item} does not exist; check the path")
    return paths


def model_inputs(images: list[str | Path], meta: dict, device="cpu") -> torch.Tensor:
    """The batch the network sees for these image files: N x C x input_size, normalized."""
    channels = meta["model"]["in_channels"]
    preprocess = Preprocess.from_meta(meta, channels, device)
    size = fit_size(meta)
    reduced = _reduced_for(meta, size)
    return _network_input([_fitted(load_image(p, channels, reduced), size) for p in images], preprocess, device)


def iter_predictions(path: str | Path, inputs: Iterable[str | Path], *, top_k: int = 3, device: str = "auto",
                     batch_size: int = BATCH_SIZE, skip_bad: bool = False, progress: str = "auto",
                     averaged: bool = True, compile: str = "auto", log=print) -> Iterator[dict]:
    """Top-k (class, probability) for each image of `inputs` (files and folders), in order.

    Unreadable files: listed in one VggkitError once the readable ones are done, or with skip_bad
    a log line. progress: "auto" (a bar on a TTY when there is more than one batch), "bar" or "none".
    averaged: a run's averaged weights (--ema) when it has some, else the raw ones.
    compile: torch.compile the model: "auto" (where measured faster here), "on" or "off" (inference.py).
    """
    if top_k < 1:
        raise VggkitError(f"top-k must be at least 1, got {top_k}")
    paths, forward, meta, torch_device = _runner(path, inputs, device, averaged, compile, batch_size, log)
    classes = meta["classes"]
    k = min(top_k, len(classes))
    bad: list[tuple[Path, str]] = []
    for kept, logits in _logit_batches(forward, meta, paths, batch_size, torch_device, bad, progress):
        top = logits.softmax(1).topk(k)
        for image, values, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
            yield {"image": str(image), "top": [{"class": classes[i], "index": i, "probability": p}
                                                for p, i in zip(values, indices)]}
    _report_unreadable(bad, skip_bad, log)


def predict(path: str | Path, images: Iterable[str | Path], *, top_k: int = 3, device: str = "auto",
            batch_size: int = BATCH_SIZE, skip_bad: bool = False, progress: str = "none", averaged: bool = True,
            compile: str = "auto", log=print) -> list[dict]:
    """Top-k (class, probability) for each image file (folders: their images, recursively)."""
    return list(iter_predictions(path, images, top_k=top_k, device=device, batch_size=batch_size, skip_bad=skip_bad,
                                 progress=progress, averaged=averaged, compile=compile, log=log))


@torch.no_grad()
def predict_logits(path: str | Path, images: list[str | Path], *, device: str = "auto",
                   batch_size: int = BATCH_SIZE, averaged: bool = True,
                   compile: str = "auto") -> tuple[torch.Tensor, dict]:
    """(logits N x classes as fp32 on the CPU, the model's metadata) for image files; unreadable ones raise."""
    paths, forward, meta, torch_device = _runner(path, images, device, averaged, compile, batch_size, log=None)
    bad: list[tuple[Path, str]] = []
    batches = [logits for _, logits in _logit_batches(forward, meta, paths, batch_size, torch_device, bad, "none")]
    _report_unreadable(bad, skip_bad=False, log=None)
    return torch.cat(batches) if batches else torch.empty(0, len(meta["classes"])), meta


def _runner(path, inputs, device: str, averaged: bool, compile: str, batch_size: int, log):
    """(the image files of `inputs`, the model stored at `path` as an InferenceRunner for them, its
    metadata, the device)."""
    check_policy(compile)
    paths = image_paths(inputs)
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device, averaged=averaged)
    forward = InferenceRunner(model, SPEED, torch_device, images=len(paths), batch_size=batch_size, compile=compile,
                              log=log)
    return paths, forward, meta, torch_device


def write_csv(results: Iterable[dict], out: str | Path) -> int:
    """Write predictions as CSV, atomically: path, then class_i and probability_i for i = 1..k. Returns the rows.
    A path or class name that a spreadsheet would run as a formula is written as text (untrusted.csv_cell)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise VggkitError(f"directory {out.parent} does not exist; create it or choose another --csv file")
    rows = 0

    def write(tmp: str) -> None:
        nonlocal rows
        with open(tmp, "w", newline="", encoding=ENCODING, errors=ENCODING_ERRORS) as f:
            writer = csv.writer(f)
            for result in results:
                if rows == 0:
                    k = len(result["top"])
                    writer.writerow(["path"] + [f"{name}_{i}" for i in range(1, k + 1)
                                                for name in ("class", "probability")])
                top = [v for t in result["top"] for v in (csv_cell(t["class"]), f"{t['probability']:.6f}")]
                writer.writerow([csv_cell(result["image"]), *top])
                rows += 1

    atomic_write(out, write)
    return rows


def format_line(result: dict) -> str:
    """One line of text for a prediction: path, then the top classes with probabilities (control characters
    in names escaped: untrusted.printable)."""
    return printable(result["image"]) + ": " + ", ".join(f"{printable(t['class'])} {t['probability']:.3f}"
                                                         for t in result["top"])


def _logit_batches(forward, meta: dict, paths: list[Path], batch_size: int, device, bad: list, progress: str):
    """(readable paths, fp32 CPU logits) for each batch of paths; (path, message) of unreadable files go to bad.
    forward(x): the model's logits (an InferenceRunner)."""
    from tqdm import tqdm

    channels = meta["model"]["in_channels"]
    preprocess = Preprocess.from_meta(meta, channels, device)
    size = fit_size(meta)
    reduced = _reduced_for(meta, size)
    show = progress == "bar" or (progress == "auto" and sys.stderr.isatty() and len(paths) > batch_size)
    with tqdm(total=len(paths), unit="image", disable=not show, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(paths), batch_size):
            kept, pixels = [], []
            for p in paths[start:start + batch_size]:
                try:
                    pixels.append(_fitted(load_image(p, channels, reduced), size))
                    kept.append(p)
                except VggkitError as e:
                    bad.append((p, str(e)))
            if kept:
                yield kept, forward(_network_input(pixels, preprocess, device)).float().cpu()
            bar.update(min(batch_size, len(paths) - start))


def _reduced_for(meta: dict, size: tuple[int, int] | None) -> tuple[int, int] | None:
    """Models trained on streamed photos ("crop": "center") read files as the prepared cache did: reduced
    on decode for their stored size; others decode whole, as their in-memory training images were."""
    return size if size is not None and interpolation_of(meta).get("crop") == CENTER else None


def _fitted(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """A C x H x W uint8 image fitted to size (image.fit), or as it is without one."""
    if size is None or tuple(image.shape[1:]) == tuple(size):
        return image
    return torch.from_numpy(np.array(fit(image.permute(1, 2, 0).numpy(), size))).permute(2, 0, 1)


def _network_input(images: list[torch.Tensor], preprocess: Preprocess, device) -> torch.Tensor:
    """Preprocessed N x C x input_size: one whole-batch pass when the images share a size (fitted ones do)."""
    if len({tuple(im.shape) for im in images}) == 1:
        return preprocess(torch.stack(images).to(device))
    return torch.cat([preprocess(im[None].to(device)) for im in images])


def _report_unreadable(bad: list[tuple[Path, str]], skip_bad: bool, log) -> None:
    if not bad:
        return
    names = ", ".join(str(path) for path, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if skip_bad:
        log(f"skipped {len(bad)} unreadable image(s): {names}")
    elif len(bad) == 1:
        raise VggkitError(f"{bad[0][1]}; or skip unreadable files with --skip-bad")
    else:
        raise VggkitError(f"{len(bad)} unreadable images: {names}; remove or replace them, "
                          "or skip them with --skip-bad")
