"""Batches of photos from the prepared cache (data/prepared.py), made in DataLoader worker processes.

Per batch, in a worker: read each image of this rank's part of the global batch from the cache
(stored size, e.g. 256x256) -> for training, a random-resized crop (torchvision's: 8-100% of the
area, aspect 3/4-4/3, 10 tries then the centre) resized to the input size (PIL bilinear, which
averages when shrinking) and a random horizontal flip -> a uint8 batch N x C x H x W. In this
process: to the device (pinned memory and a non-blocking copy on CUDA) -> preprocess.Preprocess
(normalize; at evaluation the centre crop of the stored image) -> random erasing -> channels ->
dtype / memory format, as the in-memory loader (pipeline.Batches) does.

The order is pipeline.epoch_order, a pure function of (seed, epoch), and each image's crop and flip a
pure function of (seed, epoch, batch, its place in the global batch): the same batches whatever the
number of workers or ranks, and a resumed epoch continues with the batches it would have had.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .data.dataset import FileDataset
from .data.prepared import Prepared, as_is
from .pipeline import Batches, epoch_order, rank_part

def stream_workers(workers: int | None = None, device=None) -> int:
    """workers as given; else, for decoding (no device), one process per core this process may use; for
    the batches of a training on the CPU none: every core already trains, and a worker would only take
    its cycles and add a hand-over (measured slower with 2 workers on 2 cores, BENCHMARKS.md); beside a GPU, one per core."""
    if workers is not None:
        return workers
    if device is not None and torch.device(device).type == "cpu":
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults (its ImageNet training recipe)
RATIO = (3 / 4, 4 / 3)


class StreamLoader(Batches):
    """Batches (x, y) of a prepared FileDataset; see the module docstring and pipeline.Batches.
    workers: DataLoader worker processes (0: made in this process)."""

    def __init__(self, dataset: FileDataset, batch_size: int, *, workers: int = 0, **options):
        super().__init__(dataset, batch_size, **options)
        if dataset.prepared is None:
            raise ValueError("the FileDataset must be prepared (data.prepared.prepare) before it is streamed")
        self.workers = workers
        resized = self.augment is not None and self.augment.resized_crop
        self.source = _BatchSource(dataset.prepared, dataset.rows, self._n, batch_size, self.seed, self.shuffle,
                                   self.rank, self.world_size, self.preprocess.size if resized else None,
                                   flip=self.augment is not None and self.augment.flip, draw=self.draw)

    def _batches(self, epoch: int, start_batch: int):
        from torch.utils.data import DataLoader

        cuda = self.device.type == "cuda"
        # a generator of its own: DataLoader draws its workers' seeds from the one it is given, and from
        # torch's global one otherwise, which would change the run's dropout and initial weights
        loader = DataLoader(self.source, batch_size=None, sampler=[(epoch, i) for i in range(start_batch, len(self))],
                            num_workers=self.workers, collate_fn=as_is, pin_memory=cuda, generator=torch.Generator())
        for images, idx, erase in loader:
            y = self.labels[idx.to(self.device)]
            if not len(images):
                yield self._empty(), y
                continue
            x = images.to(self.device, non_blocking=cuda)
            yield self._finish(x, erase), y


class _BatchSource:
    """A DataLoader source: (epoch, batch i) -> (uint8 images N x C x H x W, their indices in the dataset,
    erasing uniforms N x 5). crop_size None: the stored images as they are (evaluation)."""

    def __init__(self, prepared: Prepared, rows: np.ndarray, n: int, batch_size: int, seed: int, shuffle: bool,
                 rank: int, world_size: int, crop_size: tuple[int, int] | None, flip: bool,
                 draw: torch.Tensor | None = None):
        self.prepared, self.rows, self.n, self.batch_size = prepared, rows, n, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.crop_size, self.flip, self.draw = crop_size, flip, draw
        self._order: tuple[int, torch.Tensor] | None = None

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n, self.seed, epoch, self.shuffle, self.draw))
        global_idx = self._order[1][i * self.batch_size:(i + 1) * self.batch_size]
        start, stop = rank_part(len(global_idx), self.rank, self.world_size)
        images, erase = [], []
        for place in range(start, stop):
            pixels = self.prepared.read(self.rows[global_idx[place]])
            if self.crop_size is not None:
                rng = np.random.default_rng([self.seed % 2**64, epoch, i, place])
                pixels = resized_crop(pixels, self.crop_size, rng)
                if self.flip and rng.random() < 0.5:
                    pixels = pixels[:, ::-1]
                erase.append(rng.random(5))
            images.append(np.ascontiguousarray(pixels))
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) if images else torch.empty(0, dtype=torch.uint8)
        uniforms = torch.from_numpy(np.array(erase, dtype=np.float32)) if erase else None
        return batch, global_idx[start:stop], uniforms


def resized_crop(pixels: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random-resized crop of H x W x C uint8 pixels, resized to size (h, w) with PIL bilinear."""
    from PIL import Image

    left, top, right, bottom = crop_box(pixels.shape[0], pixels.shape[1], rng)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    resized = image.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, right, bottom))
    return np.asarray(resized, dtype=np.uint8).reshape(size[0], size[1], pixels.shape[2])


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's RandomResizedCrop: SCALE of the area, RATIO aspect,
    ten tries, then the centre at the nearest allowed aspect."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    aspect = width / height
    w, h = (width, round(width / RATIO[0])) if aspect < RATIO[0] else (
        (round(height * RATIO[1]), height) if aspect > RATIO[1] else (width, height))
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def loader_for(dataset, batch_size: int, *, workers: int = 0, **options) -> Batches:
    """The loader of a dataset: in memory (pipeline.BatchLoader) or streamed from its prepared cache."""
    from .pipeline import BatchLoader

    if isinstance(dataset, FileDataset):
        return StreamLoader(dataset, batch_size, workers=workers, **options)
    return BatchLoader(dataset, batch_size, **options)


def prepare_photos(folder, *, input_size: int | None = None, workers: int | None = None, skip_bad: bool = False,
                   progress: bool = False, log=print):
    """Decode the photos of an image folder into the prepared cache for training at input_size
    (default: what train decides, decide.photo_input_size); returns the data.prepared.Prepared."""
    from pathlib import Path

    from .data.folder import load_folder
    from .data.prepared import cached, prepare_datasets
    from .decide import MIN_INPUT, photo_input_size
    from .errors import VggkitError
    from .preprocess import storage_size

    if workers is not None and workers < 0:
        raise VggkitError(f"workers must be 0 or more, got {workers}")
    datasets, _, _ = load_folder(Path(folder).expanduser(), skip_bad, log, streaming="on")
    first = next(iter(datasets.values()))
    if input_size is None:
        input_size, _ = photo_input_size(*first.image_size, MIN_INPUT)
    size = (storage_size(input_size),) * 2
    found = cached(first.folder, size)
    prepared = prepare_datasets(datasets, size, skip_bad=skip_bad, workers=stream_workers(workers),
                                progress=progress, log=log)
    if found is not None:
        log(f"{len(first.folder.paths):,} images already prepared at {size[1]}x{size[0]} in {found.path}")
    return next(iter(prepared.values())).prepared
