"""IDX files of unsigned bytes (the MNIST family's format), gzip-compressed or not.

A file is read as a stream: its header first, checked against the dimensions expected of it (the
registry's counts, IdxFormat) and against what the machine can hold, then exactly the bytes the
header announces. Nothing larger than the expected data is ever allocated or decompressed: a gzip
bomb, a header claiming billions of images, a file with gigabytes after its data all stop there.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from .dataset import Dataset

MAGIC = b"\0\0\x08"  # then one byte: the number of dimensions
GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20
TRAILING_SHOWN = 1 << 20  # bytes after the data counted in the message; beyond, "more than"


def read_idx(path: str | Path, ndim: int | None = None, shape: tuple[int | None, ...] | None = None,
             what: str = "") -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not) as an array of its dimensions.

    shape: the dimensions it must have (None where any will do; its length is then ndim), checked
    against the header before the data is read; `what` names them in that message ("Fashion-MNIST's
    60,000 train images")."""
    path = Path(path)
    if shape is not None:
        ndim = len(shape)
    with _stream(path) as stream:
        head = _read(stream, 4, path)
        if len(head) < 4 or head[:3] != MAGIC or not 1 <= head[3] <= 4:
            raise VggkitError(f"{path} is not an IDX file of bytes (magic number {head[:4].hex() or 'missing'}, "
                              "expected 0000080n); is it the right file?")
        nd = head[3]
        if ndim is not None and nd != ndim:
            raise VggkitError(f"{path} has {nd} dimensions, expected {ndim} (images 3, labels 1); are the files "
                              "mixed up?")
        raw_dims = _read(stream, 4 * nd, path)
        if len(raw_dims) < 4 * nd:
            raise VggkitError(f"{path} is truncated (header incomplete); delete it and get it again")
        dims = struct.unpack(f">{nd}I", raw_dims)
        _check_dims(path, dims, shape, what)
        need = math.prod(dims)
        data = np.empty(need, np.uint8)
        have = _read_into(stream, memoryview(data), path)
        if have < need:
            raise VggkitError(f"{path} is truncated ({have:,} bytes of data, its header says {need:,}); "
                              "delete it and get it again")
        extra = len(_read(stream, TRAILING_SHOWN + 1, path))
        if extra:
            count = f"more than {TRAILING_SHOWN:,}" if extra > TRAILING_SHOWN else f"{extra:,}"
            raise VggkitError(f"{path} has {count} bytes after its data (header says {need:,}); the file is damaged")
    return data.reshape(dims)


def _check_dims(path: Path, dims: tuple[int, ...], shape, what: str) -> None:
    """The header's dimensions against the expected ones, then against what the machine can hold."""
    from ..bounds import check_fits

    if shape is not None and any(want is not None and got != want for got, want in zip(dims, shape)):
        expected = "x".join("N" if want is None else f"{want:,}" for want in shape)
        raise VggkitError(f"{path}: its header says {'x'.join(f'{d:,}' for d in dims)}, but {what or 'it'} "
                          f"{'are' if what else 'should be'} {expected}; it is damaged or not the right file: "
                          "delete it and get it again")
    check_fits(math.prod(dims), f"{path} ({'x'.join(f'{d:,}' for d in dims)} bytes by its header)",
               "it is damaged or not the right file: delete it and get it again")


@contextmanager
def _stream(path: Path):
    """The file's data as a stream: gunzipped when it is gzip data (by its first bytes)."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise VggkitError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    with raw:
        start = _read(raw, 4, path)
        raw.seek(0)
        if start[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream
            return
        if path.suffix == ".gz" and start[:3] != MAGIC:
            raise VggkitError(f"{path} is not a gzip file (it starts with {start.hex() or 'nothing'}); "
                              "delete it and get it again")
        yield raw


def _read(stream, n: int, path: Path) -> bytes:
    """Up to n bytes (fewer only at the end of the data)."""
    chunks, got = [], 0
    while got < n:
        chunk = _guarded(stream.read, min(n - got, CHUNK), path)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_into(stream, buffer: memoryview, path: Path) -> int:
    """Fill buffer from the stream; the number of bytes read (less than its size only at the end of the data)."""
    got = 0
    while got < len(buffer):
        n = _guarded(stream.readinto, buffer[got:got + CHUNK], path)
        if not n:
            break
        got += n
    return got


def _guarded(read, arg, path: Path):
    try:
        return read(arg)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise VggkitError(f"{path} is a damaged or truncated gzip file ({e}); delete it and get it again") from None
    except OSError as e:
        raise VggkitError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None


def read_idx_pair(images_path: str | Path, labels_path: str | Path, num_classes: int, count: int | None = None,
                  side: int | None = None, what: str = "") -> Dataset:
    """Images and labels files checked against each other; classes are named 0..num_classes-1.
    count / side: how many images of side x side the files must hold (None: any); `what` names them."""
    images = read_idx(images_path, shape=(count, side, side), what=f"{what} images" if what else "")
    labels = read_idx(labels_path, shape=(count,), what=f"{what} labels" if what else "")
    if len(images) != len(labels):
        raise VggkitError(f"{labels_path} has {len(labels):,} labels but {images_path} has {len(images):,} images; "
                          "the files do not belong together")
    if len(labels) and labels.max() >= num_classes:
        raise VggkitError(f"{labels_path} has label {labels.max()}, out of range for {num_classes} classes; "
                          "is it the right file?")
    return Dataset(images[..., None], labels.astype(np.int64), [str(i) for i in range(num_classes)])


@dataclass(frozen=True)
class IdxFormat:
    """A dataset in IDX files (the MNIST family); an instance is the registry entry's reader.
    Its files are read against the official counts and image side: a file that claims more is refused
    before its data is read."""
    title: str  # "Fashion-MNIST", for messages
    counts: tuple[int, int] | None = (60_000, 10_000)  # the official train / test images; None: any
    side: int = 28

    def __call__(self, paths: list[Path], classes: list[str]) -> tuple[Dataset, Dataset]:
        """(train, test) from train images, train labels, test images, test labels, in that order."""
        splits = []
        counts = self.counts or (None, None)
        for (images, labels), count, split in zip((paths[:2], paths[2:]), counts, ("train", "test")):
            what = f"{self.title}'s {count:,} {split}" if count is not None else f"{self.title}'s {split}"
            dataset = read_idx_pair(images, labels, len(classes), count=count, side=self.side, what=what)
            dataset.classes = list(classes)
            splits.append(dataset)
        return splits[0], splits[1]


def read_idx_splits(paths: list[Path], classes: list[str]) -> tuple[Dataset, Dataset]:
    """(train, test) from train images, train labels, test images, test labels: any counts, 28x28."""
    return IdxFormat("the dataset", counts=None)(paths, classes)
