"""load_data: train / val / test splits of a named dataset, the bundled sample or an image folder.

Validation is always carved from train (never from test), seeded and stratified by class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from .dataset import SAMPLE_NOTE, Dataset, DataSplits, channel_stats, split_off, stratified_indices
from .folder import load_folder
from .named import DataNotFound, load_named
from .registry import REGISTRY
from .sample import SAMPLE, SAMPLE_OF, SAMPLE_SOURCE, load_sample


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


def load_data(data: str = "fashion-mnist", *, data_dir=None, val_size: int | None = None, seed: int = 0,
              download: bool = True, allow_sample: bool = False, skip_bad: bool = False,
              limit: int | None = None, test_limit: int | None = None, mirrors: list[str] | None = None,
              log=print) -> DataSplits:
    """Train / val / test splits of a named dataset, the bundled sample or an image folder.

    val_size: images carved from train for validation (stratified, seeded); default 5,000 for
    the named datasets, 500 for the sample, 10% for an image folder without val/; 0 = none.
    limit / test_limit: class-balanced, seeded caps on train (after val is carved) and test.
    """
    _positive("limit", limit)
    _positive("test_limit", test_limit)
    if val_size is not None and (not isinstance(val_size, (int, np.integer)) or val_size < 0):
        raise VggkitError(f"val_size must be 0 or a positive integer, got {val_size!r}")
    key = str(data).strip().lower()
    if key in REGISTRY or key == SAMPLE:
        src = _named_or_sample(key, data_dir, download, allow_sample, mirrors, log)
    elif os.sep in str(data) or "/" in str(data) or Path(data).expanduser().exists():
        src = _folder(str(data), skip_bad, val_size, log)
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
        train, val = split_off(train, n_val, seed, salt=1)
    if limit is not None and limit < len(train):
        train = train.subset(stratified_indices(train.labels, limit, seed, salt=2))
    if test is not None and test_limit is not None and test_limit < len(test):
        test = test.subset(stratified_indices(test.labels, test_limit, seed, salt=3))
    mean, std = channel_stats(train.images)
    return DataSplits(name=src.name, train=train, val=val, test=test, classes=list(src.classes), source=src.source,
                      is_sample=src.is_sample, mean=mean, std=std, flips_safe=src.flips_safe)


def _named_or_sample(key: str, data_dir, download: bool, allow_sample: bool, mirrors, log) -> _Source:
    """A registered dataset, or the bundled sample (asked for, or standing in where allowed)."""
    name = SAMPLE_OF if key == SAMPLE else key
    entry = REGISTRY[name]
    if key != SAMPLE:
        try:
            train, test, source = load_named(entry, data_dir, download, mirrors, log)
            return _Source(name, train, test, val=None, classes=list(entry.classes), source=source,
                           is_sample=False, default_val=entry.val_size, flips_safe=entry.flips_safe)
        except DataNotFound as e:
            if not (allow_sample and name == SAMPLE_OF):
                raise
            log(f"{e}")
            log(f"falling back to the bundled Fashion-MNIST sample (5,000 train + 1,000 test images): {SAMPLE_NOTE}")
    train, test = load_sample()
    return _Source(name, train, test, val=None, classes=list(entry.classes), source=SAMPLE_SOURCE,
                   is_sample=True, default_val=len(train) // 10, flips_safe=entry.flips_safe)


def _folder(data: str, skip_bad: bool, val_size: int | None, log) -> _Source:
    root = Path(data).expanduser()
    trees, classes = load_folder(root, skip_bad, log)
    train, val = trees["train"], trees.get("val")
    _, h, w, c = train.images.shape
    n = sum(len(d) for d in trees.values())
    source = f"{root} (image folder, {n:,} images, {w}x{h}, {'RGB' if c == 3 else 'grayscale'})"
    if val is not None and val_size:  # 0 (e.g. from evaluate) needs no note
        log(f"note: {root}/val exists, so val_size={val_size} is ignored")
    return _Source(data, train, trees.get("test"), val=val, classes=classes, source=source, is_sample=False,
                   default_val=len(train) // 10)


def _positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise VggkitError(f"{name} must be a positive integer, got {value!r}")
