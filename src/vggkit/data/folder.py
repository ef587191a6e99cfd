"""Image folders: one sub-folder of images per class, or train/ with optional val/ and test/ trees.

Without test/ a test split is carved from the training images, without val/ a validation split
(see load.py). Pixels as image.py reads them: grayscale images stay one channel unless some image
is in color (then all are RGB). Images of different sizes are fitted (image.fit: centre crop to the
aspect ratio, bilinear resize) to the median height and the median width, which is the common size
whenever most images share one; a note in the log says how many. Each file is opened twice: once
for its size (header only), once for its pixels, so only the fitted pixels are ever held.

Photos stay on disk (streaming="auto"): a folder whose images' median shorter side is PHOTO_SIDE or
more, or whose pixels at the median size would take more than MEMORY_BUDGET, is listed, labelled and
split from the headers alone (FileDataset); its pixels are decoded once, at the size training needs,
into the prepared cache (prepared.py). streaming="on"/"off" forces either path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from .dataset import Dataset, FileDataset, FolderFiles, median_size
from .image import IMAGE_KINDS, ImageTooLarge, fit, image_files, natural_channels, open_image, pixels_of, shown_size
from .named import datasets_with_files_in
from .prepared import read_headers, write_headers
from .registry import REGISTRY


PHOTO_SIDE = 128  # median shorter side from which a folder counts as photos (the digits, CIFAR, own small crops: below)
MEMORY_BUDGET = 2 << 30  # bytes of pixels at the median size above which any folder is streamed
STREAMING = ("auto", "on", "off")


def load_folder(root: Path, skip_bad: bool, log, image_size: tuple[int, int] | None = None,
                channels: int | None = None, streaming: str = "auto"
                ) -> tuple[dict[str, Dataset | FileDataset], list[str], str | None]:
    """Datasets per tree ("train" and, if present, "val"/"test") with shared classes, and why they
    stay on disk (FileDatasets; None: in memory, Datasets).

    image_size (h, w) / channels: what to bring every image to (a model's); default: decided from the images.
    """
    trees = _trees(root)
    classes = _classes(trees["train"])
    files = {split: _labelled_files(tree, classes, trees["train"]) for split, tree in trees.items()}
    images, streamed = _read_images(files, classes, root, skip_bad, log, image_size, channels, streaming)
    for split in trees:
        _check_classes_left(files[split], images[split], classes, trees[split])
    return images, classes, streamed


def load_labelled_folder(root: Path, classes: list[str], skip_bad: bool, log, image_size: tuple[int, int] | None = None,
                         channels: int | None = None, streaming: str = "auto") -> Dataset | FileDataset:
    """Every image of root's class sub-folders, labelled by the given classes (a model's; a subset may be present)."""
    root = Path(root)
    if not root.is_dir():
        raise VggkitError(f"{root}: no such folder; give a folder with one sub-folder of images per class")
    names = [d.name for d in _class_dirs(root)]
    strangers = [n for n in names if n not in classes]
    if not names or strangers:
        found = f"its sub-folders {', '.join(strangers)} are not" if strangers else "it has no sub-folders named after"
        trees = [n for n in ("test", "val", "train") if n in strangers]
        fix = (f"give one of its trees, e.g. {root / trees[0]}" if trees and trees[0] not in classes
               else f"give a folder with one sub-folder per class, e.g. {root / classes[0]}/001.png")
        raise VggkitError(f"{root}: {found} classes of the model ({', '.join(classes)}); {fix}")
    files = _labelled_files(root, classes, root)
    return _read_images({"all": files}, classes, root, skip_bad, log, image_size, channels, streaming)[0]["all"]


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
                          f"{IMAGE_KINDS} images per class, e.g. {train}/cat/001.png")
    if len(classes) == 1:
        raise VggkitError(f"{train} has one class sub-folder ({classes[0]}); a classifier needs at least two: "
                          "add a sub-folder of images for each other class")
    return classes


def _labelled_files(tree: Path, classes: list[str], train: Path) -> list[tuple[Path, int]]:
    files = []
    for d in _class_dirs(tree):
        if d.name not in classes:
            raise VggkitError(f"{d} is not a class of {train} ({', '.join(classes)}); rename or remove it")
        images = image_files(d)
        if not images:
            raise VggkitError(f"{d} holds no {IMAGE_KINDS} images; add some or remove the folder")
        files += [(p, classes.index(d.name)) for p in images]
    return files


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes_left(files: list[tuple[Path, int]], dataset: Dataset | FileDataset, classes: list[str], tree: Path) -> None:
    empty = sorted({label for _, label in files} - set(dataset.labels.tolist()))
    if empty:
        names = ", ".join(classes[i] for i in empty)
        raise VggkitError(f"no readable images left for class(es) {names} in {tree}; add some")


@dataclass
class _Probe:
    """What a file's header says: its shown size and whether it is grayscale; and its (bytes, mtime in ns)."""
    path: Path
    label: int
    size: tuple[int, int]
    channels: int
    stat: tuple[int, int]


def _read_images(files: dict[str, list[tuple[Path, int]]], classes: list[str], root: Path, skip_bad: bool, log,
                 image_size, channels, streaming: str = "auto") -> tuple[dict, str | None]:
    """One dataset per split, every image at one size and channel count (in memory), or left on disk
    with the reason; unreadable files raise or are skipped."""
    if streaming not in STREAMING:
        raise VggkitError(f"streaming must be one of {', '.join(STREAMING)}, got {streaming!r}")
    bad: list[str] = []
    known = read_headers(root)
    probes = {split: _probe_all(items, root, bad, known) for split, items in files.items()}
    every = [p for items in probes.values() for p in items]
    if not every:
        _report_bad(bad, root, skip_bad, log)
        raise VggkitError(f"no readable images in {root}; add some")
    size = tuple(image_size) if image_size is not None else _median_size(every)
    channels = channels or max(p.channels for p in every)
    streamed = _stream_reason(every, size, channels, streaming)
    if streamed:
        _report_bad(bad, root, skip_bad, log)
        write_headers(root, {str(p.path): [*p.stat, *p.size, p.channels] for p in every}, known)
        return _on_disk(probes, root, channels, classes), streamed
    _note_resized(every, size, root, log, image_size is not None)
    datasets = {split: _fitted(items, size, channels, classes, root, bad) for split, items in probes.items()}
    _report_bad(bad, root, skip_bad, log)
    return datasets, None


def _stream_reason(probes: list[_Probe], size: tuple[int, int], channels: int, streaming: str) -> str | None:
    """Why these images stay on disk, or None: they are read into memory (see the module docstring)."""
    if streaming != "auto":
        return "--streaming on" if streaming == "on" else None
    h, w = _median_size(probes)
    if min(h, w) >= PHOTO_SIDE:
        return f"photos, {w}x{h} median"
    need = len(probes) * size[0] * size[1] * channels
    if need > MEMORY_BUDGET:
        return f"{need / 2**30:.1f} GiB of pixels"
    return None


def _on_disk(probes: dict[str, list[_Probe]], root: Path, channels: int, classes: list[str]) -> dict[str, FileDataset]:
    """A FileDataset per split over one FolderFiles of every readable file (what the prepared cache holds)."""
    every = [p for items in probes.values() for p in items]
    resolved = root.resolve()  # once: resolving 20,000 paths one by one takes seconds
    folder = FolderFiles(str(resolved), [os.path.join(resolved, os.path.relpath(p.path, root)) for p in every],
                         np.array([p.size for p in every], dtype=np.int64).reshape(-1, 2),
                         [p.stat for p in every], channels)
    datasets, start = {}, 0
    for split, items in probes.items():
        rows = np.arange(start, start + len(items), dtype=np.int64)
        datasets[split] = FileDataset(folder, rows, np.array([p.label for p in items], dtype=np.int64), classes)
        start += len(items)
    return datasets


def _probe_all(items: list[tuple[Path, int]], root: Path, bad: list[str], known: dict) -> list[_Probe]:
    """Each file's header read (or, where `known` holds the file at the same size and time, remembered)."""
    from PIL import UnidentifiedImageError

    probes = []
    for path, label in items:
        try:
            status = path.stat()
            stat = (status.st_size, status.st_mtime_ns)
            remembered = known.get(str(path))
            if remembered is not None and tuple(remembered[:2]) == stat:
                probes.append(_Probe(path, label, (remembered[2], remembered[3]), remembered[4], stat))
                continue
            with open_image(path) as image:
                probes.append(_Probe(path, label, shown_size(image), natural_channels(image), stat))
        except ImageTooLarge:
            bad.append(f"{path.relative_to(root)} (too large)")
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
            bad.append(str(path.relative_to(root)))
    return probes


def _median_size(probes: list[_Probe]) -> tuple[int, int]:
    """The lower median of the heights and of the widths: the common size when most images share one."""
    return median_size(np.array([p.size for p in probes], dtype=np.int64).reshape(-1, 2))


def _note_resized(probes: list[_Probe], size: tuple[int, int], root: Path, log, given: bool) -> None:
    others = sum(p.size != size for p in probes)
    if others:
        what = "the size the model was trained on" if given else "the median size"
        log(f"note: {others} of {len(probes)} images in {root} are not {size[1]}x{size[0]} ({what}); centre-cropped "
            "them to its aspect ratio and resized them to it")


def _fitted(probes: list[_Probe], size: tuple[int, int], channels: int, classes: list[str], root: Path,
            bad: list[str]) -> Dataset:
    """The pixels of the probed files at size and channels, in file order; unreadable ones added to bad."""
    from PIL import UnidentifiedImageError

    images = np.empty((len(probes), *size, channels), dtype=np.uint8)
    kept = []
    for i, probe in enumerate(probes):
        try:
            with open_image(probe.path) as image:
                images[i] = fit(pixels_of(image, channels), size)
            kept.append(i)
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
            bad.append(str(probe.path.relative_to(root)))
    if len(kept) < len(probes):
        images = images[kept]
    labels = np.array([probes[i].label for i in kept], dtype=np.int64)
    return Dataset(images, labels, classes, paths=[str(probes[i].path) for i in kept])


def _report_bad(bad: list[str], root: Path, skip_bad: bool, log) -> None:
    if not bad:
        return
    names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not skip_bad:
        raise VggkitError(f"{len(bad)} unreadable image(s) in {root}: {names}; remove or replace them, "
                          "or skip them with skip_bad=True (--skip-bad)")
    log(f"skipped {len(bad)} unreadable image(s) in {root}: {names}")
