"""Image folders: one sub-folder of PNG/JPEG images per class, or train/ with optional val/ and test/ trees.

Without test/ there is no test split; without val/ the validation split is carved from train
(see load.py). Grayscale images stay one channel unless some image is in color (then all are
RGB). Images of different sizes are resized (bilinear) to the most common size, with a note in the log.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from .dataset import Dataset
from .named import datasets_with_files_in
from .registry import REGISTRY

IMAGE_EXTS = {".png", ".jpg", ".jpeg"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def load_folder(root: Path, skip_bad: bool, log) -> tuple[dict[str, Dataset], list[str]]:
    """Datasets per tree ("train" and, if present, "val"/"test") with shared classes."""
    trees = _trees(root)
    classes = _classes(trees["train"])
    files = {split: _labelled_files(tree, classes, trees["train"]) for split, tree in trees.items()}
    pixels = _read_all(files, root, skip_bad, log)
    for split in trees:
        present = {label for _, label in pixels[split]}
        wanted = {label for _, label in files[split]}
        if wanted - present:
            empty = ", ".join(classes[i] for i in sorted(wanted - present))
            raise VggkitError(f"no readable images left for class(es) {empty} in {trees[split]}; add some")
    return _stack(pixels, classes, root, log), classes


def _trees(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise VggkitError(f"{root}: no such folder; give {', '.join(REGISTRY)} or a folder with one "
                          "sub-folder of images per class")
    if (root / "train").is_dir():
        return {split: root / split for split in ("train", "val", "test") if (root / split).is_dir()}
    return {"train": root}


def _classes(train: Path) -> list[str]:
    classes = [d.name for d in _class_dirs(train)]
    if not classes:
        named = datasets_with_files_in(train)
        hint = (f" (it holds files of {' or '.join(named)}: use the dataset's name with --data-dir)" if named
                else "")
        raise VggkitError(f"{train} has no class sub-folders{hint}; expected one sub-folder of "
                          f"PNG/JPEG images per class, e.g. {train}/cat/001.png")
    return classes


def _labelled_files(tree: Path, classes: list[str], train: Path) -> list[tuple[Path, int]]:
    files = []
    for d in _class_dirs(tree):
        if d.name not in classes:
            raise VggkitError(f"{d} is not a class of {train} ({', '.join(classes)}); rename or remove it")
        images = _image_files(d)
        if not images:
            raise VggkitError(f"{d} holds no PNG/JPEG images; add some or remove the folder")
        files += [(p, classes.index(d.name)) for p in images]
    return files


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_all(files: dict[str, list[tuple[Path, int]]], root: Path, skip_bad: bool,
              log) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Pixels per split, in file order; unreadable files raise, or are skipped with a log line."""
    from PIL import Image, UnidentifiedImageError

    pixels: dict[str, list[tuple[np.ndarray, int]]] = {split: [] for split in files}
    bad = []
    for split, items in files.items():
        for path, label in items:
            try:
                pixels[split].append((_read_image(path), label))
            except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
                bad.append(str(path.relative_to(root)))
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        if not skip_bad:
            raise VggkitError(f"{len(bad)} unreadable image(s) in {root}: {names}; remove or replace them, "
                              "or skip them with skip_bad=True (--skip-bad)")
        log(f"skipped {len(bad)} unreadable image(s) in {root}: {names}")
    return pixels


def _read_image(path: Path) -> np.ndarray:
    """Pixels H x W x C (C = 1 for grayscale modes, else 3); raises OSError/ValueError-like errors."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        gray = im.mode in _GRAY_MODES
        array = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
    return array[..., None] if gray else array


def _stack(pixels: dict[str, list[tuple[np.ndarray, int]]], classes: list[str], root: Path,
           log) -> dict[str, Dataset]:
    """One Dataset per split, every image at the most common size and the same number of channels."""
    sizes = Counter(a.shape[:2] for items in pixels.values() for a, _ in items)
    (h, w), _ = sizes.most_common(1)[0]
    total = sum(sizes.values())
    if len(sizes) > 1:
        log(f"note: {total - sizes[(h, w)]} of {total} images in {root} are not {w}x{h} (the most common size); "
            "resized them to it")
    channels = max(a.shape[2] for items in pixels.values() for a, _ in items)
    datasets = {}
    for split, items in pixels.items():
        arrays = [_fit(a, h, w, channels) for a, _ in items]
        labels = np.array([label for _, label in items], dtype=np.int64)
        datasets[split] = Dataset(np.stack(arrays), labels, classes)
    return datasets


def _fit(array: np.ndarray, h: int, w: int, channels: int) -> np.ndarray:
    from PIL import Image

    if array.shape[:2] != (h, w):
        im = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        array = np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8).reshape(h, w, -1)
    if array.shape[2] != channels:
        array = np.repeat(array, channels, axis=2)  # gray -> RGB, as PIL's convert does
    return array
