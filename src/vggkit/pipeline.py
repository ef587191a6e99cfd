"""The in-memory batch pipeline: uint8 images on the device, batches made with whole-batch tensor ops.

Per batch: gather by index (uint8, stored size) -> flip / random crop (uint8, stored size, where
they are cheap and where the crop padding is meant) -> preprocess.Preprocess (float, normalize,
resize to input_size: what predict and evaluate do too) -> random erasing (value 0, i.e. the mean,
as torchvision's RandomErasing after Normalize) -> grayscale to 3 channels if out_channels asks ->
dtype / memory format.

Reproducibility: the epoch's order is a pure function of (seed, epoch) and the augmentation of
batch i a pure function of (seed, epoch, i), drawn on CPU generators for the whole global batch
(so it does not depend on the device, on world_size, or on where iteration starts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset
from .errors import VggkitError
from .preprocess import Preprocess


@dataclass
class Augment:
    crop_padding: int = 0  # random crop with this zero padding, in stored-image pixels (0 = off)
    flip: bool = False  # random horizontal flip
    erasing: float = 0.0  # probability of random erasing per image (0 = off)
    resized_crop: bool = False  # photos (stream.py): a random-resized crop instead of the padded one

    def __post_init__(self):
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise VggkitError(f"crop padding must be an integer >= 0, got {self.crop_padding!r}")
        if not 0.0 <= self.erasing <= 1.0:
            raise VggkitError(f"erasing probability must be between 0 and 1, got {self.erasing!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.erasing or self.resized_crop)


def _check_crop_padding(augment: Augment | None, dataset: Dataset) -> None:
    """A crop padding larger than the images pads every batch by more than the images themselves
    (100,000 on 28x28 images: hundreds of GB), for crops that hold padding only: refused before a batch is made."""
    if augment is None or not augment.crop_padding or not len(dataset):
        return
    _, height, width, _ = dataset.images.shape
    if augment.crop_padding > max(height, width):
        padded = f"{height + 2 * augment.crop_padding:,}x{width + 2 * augment.crop_padding:,}"
        raise VggkitError(f"crop padding {augment.crop_padding:,} is larger than the {width}x{height} training images "
                          f"(every batch would be padded to {padded}); use at most {max(height, width)} "
                          "(the recipes use 2)")


def _seed(*parts: int) -> int:
    """A 64-bit seed mixed from non-negative-mapped integers (no collisions between nearby tuples)."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0])


class Batches:
    """What the in-memory and the streaming loaders share: the epoch's order, global batches split
    across ranks, iteration from any batch (resume), and the float end of a batch (normalize, erase,
    channels, dtype, memory format). Subclasses make the uint8 images of a global batch's part.

    Distributed: global batch i (batch_size images of the epoch's order) is split into
    world_size contiguous parts and rank r gets part r. Every rank yields the same number of
    batches. With drop_last=False the last global batch may be short: it is split as evenly as
    possible (the first ranks get one more), and a part may be empty (x of shape [0, C, S, S]).
    """

    def __init__(self, dataset, batch_size: int, *, device="cpu", input_size: int = 28, mean=(0.0,), std=(1.0,),
                 crop: str | None = None, shuffle=False, seed=0, drop_last=False, augment: Augment | None = None,
                 channels_last=False, dtype=torch.float32, rank=0, world_size=1, out_channels: int | None = None,
                 draw: torch.Tensor | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise VggkitError(f"batch size must be a positive integer, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise VggkitError(f"rank {rank} is not in 0..{world_size - 1} for world size {world_size}")
        if batch_size % world_size:
            raise VggkitError(f"batch size {batch_size} does not divide by world size {world_size}; "
                              f"use a multiple of {world_size}")
        channels = dataset.channels
        if out_channels not in (None, channels) and not (channels == 1 and out_channels == 3):
            raise VggkitError(f"cannot make {out_channels}-channel inputs from {channels}-channel images")
        self.device = torch.device(device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.input_size, self.shuffle, self.seed, self.drop_last = input_size, shuffle, seed, drop_last
        self.draw = draw  # class-balanced sampling: each image's chance (epoch_order)
        self.augment = augment if augment is not None and augment.enabled else None
        self.channels_last, self.dtype = channels_last, dtype
        self.channels = out_channels or channels
        self.epoch = 0
        self.labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64).to(self.device)
        self.preprocess = Preprocess(input_size, mean, std, channels, self.device, crop=crop)

        self._n = len(dataset)
        full, last = divmod(self._n, batch_size)
        self._num_batches = full if drop_last or not last else full + 1
        part = batch_size // world_size
        start, stop = self._part(last, rank)
        self.num_samples = full * part + (0 if drop_last else stop - start)

    def _part(self, m: int, rank: int) -> tuple[int, int]:
        """Rank's [start, stop) within a global batch of m images: contiguous, as even as possible."""
        return rank_part(m, rank, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        return self.iter_from(0)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's image order (CPU int64), identical on every rank."""
        return epoch_order(self._n, self.seed, self.epoch if epoch is None else epoch, self.shuffle, self.draw)

    def iter_from(self, start_batch: int):
        """Batches start_batch..len-1 of the current epoch, identical to those of a full iteration."""
        if not 0 <= start_batch <= len(self):
            raise VggkitError(f"cannot start at batch {start_batch}: an epoch has {len(self)} batches "
                              "(did the batch size or the data change since the checkpoint?)")
        return self._batches(self.epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int):
        raise NotImplementedError

    def _empty(self) -> torch.Tensor:
        return torch.empty((0, self.channels, *self.preprocess.size), dtype=self.dtype, device=self.device)

    def _finish(self, x: torch.Tensor, erase: torch.Tensor | None) -> torch.Tensor:
        """uint8 images of a batch -> the network's input (see the module docstring)."""
        x = self.preprocess(x)
        if erase is not None and self.augment is not None and self.augment.erasing:
            x = _random_erase(x, erase, self.augment.erasing)
        if self.channels != x.shape[1]:
            x = x.expand(-1, self.channels, -1, -1)
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last if self.channels_last
                                           else torch.contiguous_format)


def rank_part(m: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's [start, stop) within a global batch of m images: contiguous, as even as possible."""
    base, extra = divmod(m, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, draw: torch.Tensor | None = None) -> torch.Tensor:
    """The order of n images in an epoch (CPU int64): a pure function of (seed, epoch).
    draw: each image's chance (balance.sample_weights): n images drawn with replacement instead."""
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(_seed(seed, epoch))
    if draw is not None:
        return torch.multinomial(draw, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


class BatchLoader(Batches):
    """Batches (x, y) of a Dataset held in memory on `device`; see the module docstring and Batches."""

    def __init__(self, dataset: Dataset, batch_size: int, **options):
        _check_crop_padding(options.get("augment"), dataset)
        super().__init__(dataset, batch_size, **options)
        images = dataset.images if dataset.images.flags.writeable else dataset.images.copy()
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)  # N C H W uint8

    def _batches(self, epoch: int, start_batch: int):
        order = self.order(epoch)
        for i in range(start_batch, len(self)):
            yield self._batch(order[i * self.batch_size:(i + 1) * self.batch_size], epoch, i)

    def _batch(self, global_idx: torch.Tensor, epoch: int, i: int):
        m = len(global_idx)
        start, stop = self._part(m, self.rank)
        idx = global_idx[start:stop].to(self.device)
        y = self.labels[idx]
        if stop == start:
            return self._empty(), y
        x = self.images[idx]
        aug, erase = self.augment, None
        if aug is not None:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch, i, 1))
            # drawn for the whole global batch, always in this order, then sliced to this rank
            flip = (torch.rand(m, generator=g) < 0.5)[start:stop]
            shift = torch.randint(0, 2 * aug.crop_padding + 1, (m, 2), generator=g)[start:stop]
            erase = torch.rand(m, 5, generator=g)[start:stop]
            if aug.flip:
                x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
            if aug.crop_padding:
                x = _random_crop(x, shift.to(self.device), aug.crop_padding)
        return self._finish(x, erase), y


def _random_crop(x: torch.Tensor, shift: torch.Tensor, pad: int) -> torch.Tensor:
    """Per image: zero-pad by `pad`, then take the H x W window at offset shift (B x 2, in 0..2*pad)."""
    b, c, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad))
    rows = (shift[:, :1] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    x = x.gather(2, rows)
    cols = (shift[:, 1:] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return x.gather(3, cols)


_LOG_RATIO = (math.log(0.3), math.log(3.3))


def _random_erase(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """torchvision-style random erasing (area 2-33%, aspect 0.3-3.3) with value 0, per image with prob p.

    u: B x 5 uniforms (apply, area, log-ratio, top, left), on the CPU.
    """
    b, _, h, w = x.shape
    area = 0.02 + u[:, 1] * 0.31
    ratio = torch.exp(_LOG_RATIO[0] + u[:, 2] * (_LOG_RATIO[1] - _LOG_RATIO[0]))
    eh = (torch.sqrt(area * ratio).clamp(max=1) * h).round().clamp(min=1)
    ew = (torch.sqrt(area / ratio).clamp(max=1) * w).round().clamp(min=1)
    top = (u[:, 3] * (h - eh + 1)).floor()
    left = (u[:, 4] * (w - ew + 1)).floor()
    params = torch.stack([top, top + eh, left, left + ew]).long().to(x.device)  # 4 x B
    apply = (u[:, 0] < p).to(x.device)
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_rows = (r >= params[0, :, None]) & (r < params[1, :, None]) & apply[:, None]  # B x H
    in_cols = (c >= params[2, :, None]) & (c < params[3, :, None])  # B x W
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(mask, 0.0)
