"""IDX files of unsigned bytes (the MNIST family's format), gzip-compressed or not."""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from .dataset import Dataset

MAGIC = b"\0\0\x08"  # then one byte: the number of dimensions


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not) as an array of its dimensions."""
    path = Path(path)
    raw = _decompressed(path)
    if len(raw) < 4 or raw[:3] != MAGIC or not 1 <= raw[3] <= 4:
        raise VggkitError(f"{path} is not an IDX file of bytes (magic number {raw[:4].hex() or 'missing'}, "
                          "expected 0000080n); is it the right file?")
    nd = raw[3]
    if ndim is not None and nd != ndim:
        raise VggkitError(f"{path} has {nd} dimensions, expected {ndim} (images 3, labels 1); are the files mixed up?")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise VggkitError(f"{path} is truncated (header incomplete); delete it and get it again")
    dims = struct.unpack(f">{nd}I", raw[4:header])
    need, have = int(np.prod(dims)), len(raw) - header
    if have < need:
        raise VggkitError(f"{path} is truncated ({have:,} bytes of data, its header says {need:,}); "
                          "delete it and get it again")
    if have > need:
        raise VggkitError(f"{path} has {have - need:,} bytes after its data (header says {need:,}); the file is damaged")
    # copy: frombuffer over bytes is read-only
    return np.frombuffer(raw, np.uint8, count=need, offset=header).reshape(dims).copy()


def _decompressed(path: Path) -> bytes:
    """The file's bytes, gunzipped when they are gzip data."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VggkitError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise VggkitError(f"{path} is a damaged or truncated gzip file ({e}); delete it and get it again") from None
    if path.suffix == ".gz" and raw[:3] != MAGIC:
        raise VggkitError(f"{path} is not a gzip file (it starts with {raw[:4].hex() or 'nothing'}); "
                          "delete it and get it again")
    return raw


def read_idx_pair(images_path: str | Path, labels_path: str | Path, num_classes: int) -> Dataset:
    """Images and labels files checked against each other; classes are named 0..num_classes-1."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise VggkitError(f"{labels_path} has {len(labels):,} labels but {images_path} has {len(images):,} images; "
                          "the files do not belong together")
    if len(labels) and labels.max() >= num_classes:
        raise VggkitError(f"{labels_path} has label {labels.max()}, out of range for {num_classes} classes; "
                          "is it the right file?")
    return Dataset(images[..., None], labels.astype(np.int64), [str(i) for i in range(num_classes)])


def read_idx_splits(paths: list[Path], classes: list[str]) -> tuple[Dataset, Dataset]:
    """(train, test) from train images, train labels, test images, test labels, in that order."""
    train = read_idx_pair(paths[0], paths[1], len(classes))
    test = read_idx_pair(paths[2], paths[3], len(classes))
    train.classes = test.classes = list(classes)
    return train, test
