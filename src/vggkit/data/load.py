"""load_data: train / val / test splits of a named dataset, the bundled sample or an image folder.

Validation is always carved from train (never from test), seeded and stratified by class. An image
folder without a test/ tree also gets a held-out test split: HELD_OUT of its images (at least one
per class, at most FOLDER_TEST_CAP), carved first, so the same folder and seed give the same test
images whatever val_size is (evaluate relies on it); then validation, HELD_OUT of the folder's
training images (at least one per class, at most FOLDER_VAL_CAP) unless val_size or a val/ tree says otherwise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from .carve import carve_train
from .dataset import SAMPLE_NOTE, Dataset, DataSplits, split_off, stats_of, stratified_indices
from .folder import load_folder
from .image import IMAGE_KINDS
from .named import DataNotFound, load_named
from .registry import REGISTRY
from .sample import SAMPLE, SAMPLE_OF, SAMPLE_SOURCE, load_sample

HELD_OUT = 0.1  # of an image folder's images, for each of test and validation
FOLDER_TEST_CAP = 10_000  # the size of the named datasets' test sets
FOLDER_VAL_CAP = 5_000  # the named datasets' validation size
TEST_SALT, TEST_LIMIT_SALT = 4, 3  # independent seeded draws (carve.py: validation 1, --limit 2)


@dataclass
class _Source:
    """What a source delivers before the splits are made."""
    name: str
    train: Dataset
    test: Dataset | None
    val: Dataset | None  # a val/ tree of an image folder; None: carve val from train
    classes: list[str]
    source: str
    is_sample: bool
    default_val: int
    flips_safe: bool = True
    held_out_val: bool = False  # the default validation split follows stratified_indices' held_out rule
    streamed: str | None = None  # why an image folder stays on disk (folder.py); None: in memory


def load_data(data: str = "fashion-mnist", *, data_dir=None, val_size: int | None = None, seed: int = 0,
              download: bool = True, allow_sample: bool = False, skip_bad: bool = False,
              limit: int | None = None, test_limit: int | None = None, mirrors: list[str] | None = None,
              image_size: tuple[int, int] | None = None, channels: int | None = None, streaming: str = "auto",
              log=print) -> DataSplits:
    """Train / val / test splits of a named dataset, the bundled sample or an image folder.

    val_size: images carved from train for validation (stratified, seeded); default 5,000 for
    the named datasets, 500 for the sample, 10% (at most 5,000) for an image folder without val/; 0 = none.
    limit / test_limit: class-balanced, seeded caps on train (after val is carved) and test.
    image_size (h, w) / channels: what an image folder's images are brought to (a model's, when
    evaluating it); default: decided from the images (folder.py).
    streaming: auto|on|off: whether an image folder's images stay on disk (folder.py; photos do).
    """
    _positive("limit", limit)
    _positive("test_limit", test_limit)
    if val_size is not None and (not isinstance(val_size, (int, np.integer)) or val_size < 0):
        raise VggkitError(f"val_size must be 0 or a positive integer, got {val_size!r}")
    key = str(data).strip().lower()
    if key in REGISTRY or key == SAMPLE:
        src = _named_or_sample(key, data_dir, download, allow_sample, mirrors, log)
    elif is_folder(data):
        src = _folder(str(data), skip_bad, val_size, seed, image_size, channels, streaming, log)
    else:
        raise VggkitError(f"unknown dataset {data!r}: use {', '.join(REGISTRY)}, {SAMPLE} or the path of an "
                          "image folder")

    train, val, test = src.train, src.val, src.test
    if val is None:
        n_val = src.default_val if val_size is None else int(val_size)
        if not len(train):  # no val_size helps: say so rather than "use a smaller val_size"
            raise VggkitError(f"{src.name} has no training images ({src.source}); check its files")
        if n_val >= len(train):
            raise VggkitError(f"val_size {n_val:,} leaves no training images ({src.name} has {len(train):,}); "
                              f"use a val_size below {len(train):,}")
    else:
        n_val = 0  # a val/ tree: nothing to carve
    train, val = carve_train(train, val, n_val, limit, seed, held_out=src.held_out_val and val_size is None)
    if test is not None and test_limit is not None and test_limit < len(test):
        test = test.subset(stratified_indices(test.labels, test_limit, seed, TEST_LIMIT_SALT))
    mean, std = stats_of(train)
    return DataSplits(name=src.name, train=train, val=val, test=test, classes=list(src.classes), source=src.source,
                      is_sample=src.is_sample, mean=mean, std=std, flips_safe=src.flips_safe, streamed=src.streamed)


def is_folder(data) -> bool:
    """Whether a --data value means an image folder rather than a named dataset."""
    key = str(data).strip().lower()
    if key in REGISTRY or key == SAMPLE:
        return False
    return os.sep in str(data) or "/" in str(data) or Path(data).expanduser().exists()


def _named_or_sample(key: str, data_dir, download: bool, allow_sample: bool, mirrors, log) -> _Source:
    """A registered dataset, or the bundled sample (asked for, or standing in where allowed)."""
    name = SAMPLE_OF if key == SAMPLE else key
    entry = REGISTRY[name]
    if key != SAMPLE:
        try:
            train, test, source = load_named(entry, data_dir, download, mirrors, log)
            return _Source(name, train, test, val=None, classes=list(train.classes), source=source,
                           is_sample=False, default_val=entry.val_size, flips_safe=entry.flips_safe)
        except DataNotFound as e:
            if not (allow_sample and name == SAMPLE_OF):
                raise
            log(f"{e}")
            log(f"falling back to the bundled Fashion-MNIST sample (5,000 train + 1,000 test images): {SAMPLE_NOTE}")
    train, test = load_sample()
    return _Source(name, train, test, val=None, classes=list(entry.classes), source=SAMPLE_SOURCE,
                   is_sample=True, default_val=len(train) // 10, flips_safe=entry.flips_safe)


def _folder(data: str, skip_bad: bool, val_size: int | None, seed: int, image_size, channels, streaming: str,
            log) -> _Source:
    root = Path(data).expanduser()
    trees, classes, streamed = load_folder(root, skip_bad, log, image_size, channels, streaming)
    train, val, test = trees["train"], trees.get("val"), trees.get("test")
    n = sum(len(d) for d in trees.values())
    default_val = _held_out(len(train), len(classes), FOLDER_VAL_CAP)
    _check_class_sizes(root / "train" if (root / "train").is_dir() else root, train, classes,
                       carve_test=test is None, carve_val=val is None and val_size is None)
    if test is None:
        n_test = _held_out(len(train), len(classes), FOLDER_TEST_CAP)
        train, test = split_off(train, n_test, seed, TEST_SALT, held_out=True)
    (h, w), c = train.image_size, train.channels
    size = f"{w}x{h} median" if streamed else f"{w}x{h}"
    source = f"{root} (image folder, {n:,} images, {size}, {'RGB' if c == 3 else 'grayscale'})"
    if val is not None and val_size:  # 0 (e.g. from evaluate) needs no note
        log(f"note: {root}/val exists, so val_size={val_size} is ignored")
    return _Source(data, train, test, val=val, classes=classes, source=source, is_sample=False,
                   default_val=default_val, held_out_val=True, streamed=streamed)


def _held_out(n: int, n_classes: int, cap: int) -> int:
    """The size of a held-out split of n images: HELD_OUT of them, at least one per class, at most cap."""
    return min(max(int(n * HELD_OUT), n_classes), cap)


def _check_class_sizes(tree: Path, train: Dataset, classes: list[str], carve_test: bool, carve_val: bool) -> None:
    """Every class must keep a training image after the held-out splits take one each."""
    need = 1 + carve_test + carve_val
    counts = np.bincount(train.labels, minlength=len(classes))
    short = [f"{classes[i]} ({counts[i]})" for i in np.flatnonzero(counts < need)]
    if short:
        splits = " + ".join(name for name, on in (("test", carve_test), ("validation", carve_val)) if on)
        listed = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
        raise VggkitError(f"{tree}: class(es) {listed} have fewer than the {need} {IMAGE_KINDS} images each class "
                          f"needs (1 each for the held-out {splits} splits, 1 to train on); add images to them, "
                          "or split the folder yourself into train/, val/ and test/ sub-folders")


def _positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise VggkitError(f"{name} must be a positive integer, got {value!r}")
