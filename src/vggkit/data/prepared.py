"""The prepared cache: an image folder's photos decoded once, at the size training needs, on disk.

    prepared = prepare(folder, (256, 256), workers=2, log=print)   # decodes what is not cached yet
    pixels = prepared.read(row)                                     # H x W x C uint8, one pread

A cache is one folder, <cache>/vggkit/prepared/<key>/, <cache> being $XDG_CACHE_HOME or
~/.cache, holding pixels.u8 (the images one after another, H x W x C uint8 each, in the rows of
FolderFiles) and manifest.json. The key covers this format's VERSION, the size and channels, how
images are fitted, and every file's path, byte size and modification time: a changed, added or
removed file makes another key, so a stale cache is never read, and the next prepare builds anew.

Each image is decoded straight to about the size it is needed at: for JPEGs, Pillow's draft mode
lets the decoder scale by 1/2, 1/4 or 1/8 in the DCT domain (a 3000x2000 photo for 256x256 is
decoded at 750x500: a sixteenth of the pixels), then image.fit (centre crop to the aspect ratio,
bilinear resize) brings it to the stored size, as in-memory folders are fitted. Decoding runs in
torch DataLoader worker processes, a chunk of files per task.

Never half-used: the cache is written in a temporary folder beside its final name (space reserved
up front, so a full disk fails at once), flushed, its manifest written last, and renamed into place
whole. A prepare that is interrupted (Ctrl-C, SIGKILL, a full disk) leaves no folder under the
final name; its temporary folder is removed by the next prepare once the process that wrote it has
gone. Reading (read) is a positioned read of one image: the OS page cache holds the file, so a
process's memory does not grow with the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VggkitError
from .dataset import FileDataset, FolderFiles
from .image import FIT, ImageTooLarge, fit, open_image, pixels_of, reduce_on_decode

VERSION = 1
PIXELS, MANIFEST = "pixels.u8", "manifest.json"
CHUNK = 8  # images per worker task: large enough to amortise the hand-over, small enough to spread the work


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vggkit" / "prepared"


def headers_path(root: Path) -> Path:
    """Where what a photo folder's headers said is remembered (listing 20,000 files reads no header twice)."""
    name = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:32]
    return cache_root().parent / "headers" / f"{name}.json"


def read_headers(root: Path) -> dict[str, list]:
    """path -> [bytes, mtime in ns, height, width, channels], as write_headers left it ({} where none)."""
    try:
        entries = json.loads(headers_path(root).read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def write_headers(root: Path, entries: dict[str, list], known: dict[str, list]) -> None:
    """Remember the headers (unless nothing changed); a cache that cannot be written only costs time."""
    if entries == known:
        return
    path = headers_path(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        pass


@dataclass
class Prepared:
    """A complete cache: every image of a FolderFiles at `size`, and the rows that could not be decoded."""
    path: Path
    size: tuple[int, int]  # (height, width)
    channels: int
    count: int
    bad: dict[int, str]  # row -> why its file could not be decoded (its pixels are zeros)

    @property
    def record_bytes(self) -> int:
        return self.size[0] * self.size[1] * self.channels

    def read(self, row: int) -> np.ndarray:
        """The pixels of one row, H x W x C uint8 (a positioned read: no memory map, no file position)."""
        if not hasattr(self, "_fd") or self._pid != os.getpid():  # a worker process opens its own
            self._fd, self._pid = os.open(self.path / PIXELS, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, self.record_bytes, int(row) * self.record_bytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(*self.size, self.channels)

    def __getstate__(self):  # sent to worker processes without the parent's descriptor
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")}


def cache_key(folder: FolderFiles, size: tuple[int, int]) -> str:
    digest = hashlib.sha256(json.dumps([VERSION, FIT, list(size), folder.channels]).encode())
    for path, (nbytes, mtime) in zip(folder.paths, folder.stats):
        digest.update(f"\n{path}\0{nbytes}\0{mtime}".encode())
    return digest.hexdigest()[:32]


def cached(folder: FolderFiles, size: tuple[int, int]) -> Prepared | None:
    """The complete cache of folder at size, or None where there is none (or it does not check out)."""
    path = cache_root() / cache_key(folder, size)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        prepared = Prepared(path, tuple(manifest["size"]), int(manifest["channels"]), int(manifest["count"]),
                            {int(row): why for row, why in manifest["bad"].items()})
        whole = (path / PIXELS).stat().st_size == prepared.count * prepared.record_bytes
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fits = (prepared.size, prepared.channels, prepared.count) == (tuple(size), folder.channels, len(folder.paths))
    return prepared if whole and fits else None


def prepare(folder: FolderFiles, size: tuple[int, int], *, workers: int = 0, progress: bool = False,
            log=print) -> Prepared:
    """The cache of folder at size (height, width): found, or built now (see the module docstring)."""
    size = (int(size[0]), int(size[1]))
    found = cached(folder, size)
    if found is not None:
        return found
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    target = root / cache_key(folder, size)
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        started = time.perf_counter()
        bad = _decode_all(folder, size, tmp / PIXELS, workers, progress)
        manifest = {"version": VERSION, "root": folder.root, "size": list(size), "channels": folder.channels,
                    "count": len(folder.paths), "bad": {str(row): why for row, why in bad.items()}}
        _write_synced(tmp / MANIFEST, json.dumps(manifest).encode())
        _publish(tmp, target, keep_theirs=lambda: cached(folder, size) is not None)
    except OSError as e:  # a full disk, an I/O error: the machine's failure (exit 1), said of the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, e.strerror, str(target)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    mib = len(folder.paths) * size[0] * size[1] * folder.channels / 2**20
    log(f"prepared {len(folder.paths):,} images at {size[1]}x{size[0]} in {seconds:.1f} s "
        f"({len(folder.paths) / max(seconds, 1e-9):.0f} images/s, {max(workers, 1)} process(es)); "
        f"cache {mib:,.0f} MiB in {target}")
    return cached(folder, size)


def _decode_all(folder: FolderFiles, size: tuple[int, int], pixels: Path, workers: int, progress: bool
                ) -> dict[int, str]:
    """Every image of folder fitted to size, written at its row; returns the rows that failed, with why."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    record = size[0] * size[1] * folder.channels
    count = len(folder.paths)
    chunks = [range(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    loader = DataLoader(_Decoder(folder.paths, size, folder.channels), batch_size=None, sampler=chunks,
                        num_workers=workers, collate_fn=as_is, generator=torch.Generator())  # see stream.py
    bad: dict[int, str] = {}
    fd = os.open(pixels, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, max(count * record, 1))  # a full disk fails here, before any decoding
        with tqdm(total=count, unit="img", desc="prepare", disable=not progress, leave=False,
                  dynamic_ncols=True) as bar:
            for first, block, failed in loader:
                os.pwrite(fd, block.tobytes(), first * record)
                bad.update(failed)
                bar.update(len(block))
        os.fsync(fd)
    finally:
        os.close(fd)
    return bad


def as_is(item):
    """DataLoader's collate_fn that leaves numpy arrays as they are (its default makes them tensors)."""
    return item


class _Decoder:
    """A DataLoader source: rows -> (first row, their pixels fitted to size, {row: why} for failures)."""

    def __init__(self, paths: list[str], size: tuple[int, int], channels: int):
        self.paths, self.size, self.channels = paths, size, channels

    def __getitem__(self, rows: range):
        block = np.zeros((len(rows), *self.size, self.channels), dtype=np.uint8)
        failed = {}
        for i, row in enumerate(rows):
            try:
                block[i] = decode_fitted(self.paths[row], self.size, self.channels)
            except ImageTooLarge:
                failed[row] = "too large"
            except Exception as e:  # noqa: BLE001 -- any decoder failure means: this file is unreadable
                failed[row] = str(e).strip()[:80] or type(e).__name__
        return rows.start, block, failed


def decode_fitted(path: str | Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """An image file's pixels fitted to size (h, w), decoded at the smallest scale that keeps its crop
    at least that size (JPEG draft mode; other formats decode whole)."""
    with open_image(path) as image:
        reduce_on_decode(image, size)
        return fit(pixels_of(image, channels), size)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, target: Path, keep_theirs) -> None:
    """Rename the finished cache into place. Where the name is taken, by the same cache finished by
    another process (keep_theirs()), ours goes; by a damaged one, ours replaces it."""
    try:
        os.rename(tmp, target)
    except OSError:
        if keep_theirs():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_abandoned(root: Path) -> None:
    """Temporary folders of prepares whose process has gone (killed): never used, so removed."""
    for tmp in root.glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


def prepare_datasets(datasets: dict, size: tuple[int, int], *, skip_bad: bool, workers: int = 0,
                     progress: bool = False, log=print) -> dict:
    """The FileDatasets of `datasets` (name -> dataset; others pass as they are) prepared at size, less the
    images that could not be decoded: listed in one VggkitError, or with skip_bad skipped with a log line."""
    from dataclasses import replace

    files = [d for d in datasets.values() if isinstance(d, FileDataset)]
    if not files:
        return datasets
    prepared = prepare(files[0].folder, size, workers=workers, progress=progress, log=log)
    if prepared.bad:
        root = files[0].folder.root
        named = [f"{os.path.relpath(files[0].folder.paths[row], root)} ({why})" for row, why in sorted(prepared.bad.items())]
        listed = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        if not skip_bad:
            raise VggkitError(f"{len(named)} image(s) in {root} could not be decoded: {listed}; "
                              "remove or replace them, or skip them with --skip-bad")
        log(f"skipped {len(named)} image(s) that could not be decoded: {listed}")
    out = {}
    for name, d in datasets.items():
        if isinstance(d, FileDataset):
            keep = np.flatnonzero([row not in prepared.bad for row in d.rows])
            d = replace(d.subset(keep), prepared=prepared)
        out[name] = d
    return out
