"""The dataset types, seeded class-balanced splits and per-channel statistics.

Dataset: images in memory, uint8 arrays N x H x W x C (C = 1 grayscale, 3 RGB), labels int64.
FileDataset: images left on disk (photos): their files, labels and sizes from the headers; the
pixels come from the prepared cache (prepared.py) once the size to store them at is known.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE_NOTE = "its accuracy is NOT comparable to published Fashion-MNIST figures"


@dataclass
class Dataset:
    images: np.ndarray  # uint8, N x H x W x C
    labels: np.ndarray  # int64, N
    classes: list[str]
    paths: list[str] | None = field(default=None, repr=False)  # the image files, for datasets read from files

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the images are stored at."""
        return tuple(int(n) for n in self.images.shape[1:3])

    def pixels(self, i: int) -> np.ndarray:
        """Image i, H x W x C uint8."""
        return self.images[i]

    def subset(self, indices) -> "Dataset":
        indices = np.asarray(indices, dtype=np.int64)
        paths = None if self.paths is None else [self.paths[i] for i in indices]
        return Dataset(self.images[indices], self.labels[indices], self.classes, paths)


@dataclass(frozen=True)
class FolderFiles:
    """Every readable image file of an image folder (all its splits), as the prepared cache holds them."""
    root: str
    paths: list[str]  # absolute
    sizes: np.ndarray  # N x 2: (height, width) as shown (EXIF orientation applied), from the headers
    stats: list[tuple[int, int]]  # (bytes, mtime in ns) per file: a changed file changes the cache's key
    channels: int  # 1 when every image is grayscale, else 3


@dataclass
class FileDataset:
    """Images of a FolderFiles by row, not decoded; `prepared` (prepared.Prepared) reads their pixels
    once the splits are prepared at a size."""
    folder: FolderFiles
    rows: np.ndarray  # int64 rows of folder
    labels: np.ndarray  # int64, N
    classes: list[str]
    prepared: object | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.folder.channels

    @property
    def paths(self) -> list[str]:
        return [self.folder.paths[r] for r in self.rows]

    @property
    def sizes(self) -> np.ndarray:
        return self.folder.sizes[self.rows]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width): the median of the folder's sizes (its images are stored at a size decided later)."""
        return median_size(self.folder.sizes)

    def pixels(self, i: int) -> np.ndarray:
        """Image i as prepared (H x W x C uint8, the stored size)."""
        return self.prepared.read(self.rows[i])

    def subset(self, indices) -> "FileDataset":
        indices = np.asarray(indices, dtype=np.int64)
        return FileDataset(self.folder, self.rows[indices], self.labels[indices], self.classes, self.prepared)


@dataclass
class DataSplits:
    name: str
    train: Dataset
    val: Dataset  # may be empty
    test: Dataset | None  # None for an image folder without a test/ tree
    classes: list[str]
    source: str
    is_sample: bool
    mean: tuple[float, ...]  # per channel, of the train images scaled to [0, 1]
    std: tuple[float, ...]
    flips_safe: bool = True  # False where a mirrored image is another class or no image at all (digits)
    streamed: str | None = None  # why the images stay on disk (FileDataset splits); None: in memory

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the images are stored at: what other images are fitted to (image.fit); for
        images on disk, the median of their sizes (they are stored at a size decided for the input)."""
        return self.train.image_size

    def describe(self) -> str:
        """One line for logs: sizes, image shape, origin."""
        (h, w), c = self.image_size, self.train.channels
        test = f"{len(self.test):,}" if self.test is not None else "no"
        note = f" -- bundled sample, {SAMPLE_NOTE}" if self.is_sample else ""
        return (f"{self.name}: {len(self.train):,} train / {len(self.val):,} val / {test} test images, "
                f"{h}x{w}x{c}, {len(self.classes)} classes, from {self.source}{note}")


def median_size(sizes: np.ndarray) -> tuple[int, int]:
    """The lower median of the heights and of the widths (N x 2): the common size when most images share one."""
    middle = (len(sizes) - 1) // 2
    return int(np.sort(sizes[:, 0])[middle]), int(np.sort(sizes[:, 1])[middle])


def stratified_indices(labels: np.ndarray, n: int, seed: int, salt: int = 0, held_out: bool = False) -> np.ndarray:
    """n sorted indices drawn per class in proportion to class frequency (largest remainder), seeded.

    held_out: a held-out split's rule on top: every class gives at least one image and keeps at
    least one (where it has two); in a corner where that leaves no room the part is a little smaller.
    """
    labels = np.asarray(labels)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    floor = np.minimum(counts - 1, 1) if held_out else np.zeros_like(counts)
    spare = counts - floor
    quota = spare * max(n - floor.sum(), 0) / max(spare.sum(), 1)
    take = np.floor(quota).astype(np.int64)
    room = take < spare - held_out
    by_remainder = [i for i in np.argsort(-(quota - take), kind="stable") if room[i]]
    take[by_remainder[: max(n - floor.sum() - take.sum(), 0)]] += 1
    take += floor
    rng = np.random.default_rng([seed & 0xFFFFFFFF, salt])
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.cumsum(counts)[:-1])
    picked = [rng.permutation(g)[:k] for g, k in zip(groups, take)]
    return np.sort(np.concatenate(picked))


def split_off(dataset: Dataset, n: int, seed: int, salt: int = 1, held_out: bool = False) -> tuple[Dataset, Dataset]:
    """(rest, part): a stratified part of n images and the rest, disjoint."""
    part = stratified_indices(dataset.labels, n, seed, salt, held_out)
    rest = np.setdiff1d(np.arange(len(dataset)), part, assume_unique=True)
    return dataset.subset(rest), dataset.subset(part)


STATS_CHUNK = 1 << 16  # pixels per bincount (see histograms)


# Photos are normalised with ImageNet's statistics: the convention for natural photos and what
# ImageNet weights expect; measuring a folder's own would mean decoding it all before training.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def photo_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std for RGB; for gray images their averages (as pretrained.py expects of
    ImageNet weights whose first convolution was summed over the three channels)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (round(sum(IMAGENET_MEAN) / 3, 6),), (round(sum(IMAGENET_STD) / 3, 6),)


def stats_of(dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A training set's normalisation: its exact channel statistics in memory, ImageNet's for photos on disk."""
    if isinstance(dataset, FileDataset):
        return photo_stats(dataset.channels)
    return channel_stats(dataset.images)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images scaled to [0, 1] (via 256-bin histograms)."""
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for hist in histograms(images).astype(np.float64):
        total = hist.sum()
        mean = (hist @ values) / total if total else 0.0
        var = (hist @ (values - mean) ** 2) / total if total else 0.0
        means.append(round(float(mean), 6))
        stds.append(round(float(np.sqrt(var)) or 1.0, 6))  # a constant channel would divide by 0
    return tuple(means), tuple(stds)


def histograms(images: np.ndarray) -> np.ndarray:
    """Per channel (C x 256), how many pixels have each value. bincount copies its input as int64:
    chunk by chunk that copy stays in cache; whole, it is 8 bytes a pixel of fresh memory (0.4 GB for
    Fashion-MNIST's train set: measured several times slower than in chunks)."""
    pixels = images.reshape(-1, images.shape[3])
    counts = np.zeros((images.shape[3], 256), dtype=np.int64)
    for start in range(0, len(pixels), STATS_CHUNK):
        chunk = pixels[start:start + STATS_CHUNK]
        for c, channel in enumerate(counts):
            channel += np.bincount(chunk[:, c], minlength=256)
    return counts
