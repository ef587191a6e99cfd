"""Datasets in memory: Fashion-MNIST / MNIST (IDX files, found locally or downloaded), image
folders, the bundled Fashion-MNIST sample, and seeded class-balanced splits.

Images are uint8 arrays N x H x W x C (C = 1 grayscale, 3 RGB), labels int64.

Where things come from:
- Named datasets ("fashion-mnist", "mnist"): the first folder holding all four IDX files
  (gz or uncompressed) among data_dir, data_dir/<name>, $VGGKIT_DATA/<name> and the cache
  ($XDG_CACHE_HOME or ~/.cache)/vggkit/<name>. A local copy is read as it is (no MD5 check).
  Otherwise the files are downloaded into the cache and verified (see download.py).
- "fashion-mnist-sample" or allow_sample=True: the bundled 5,000 + 1,000 image sample.
- An image folder: one sub-folder per class, or train/ with optional val/ and test/ trees.
  Without test/ there is no test split (DataSplits.test is None); without val/ the
  validation split is carved from train (10% by default). Images of different sizes are
  resized (bilinear) to the most common size, with a note in the log.

Validation is always carved from train (never from test), seeded and stratified by class.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import download as dl
from .errors import VggkitError

NAMED = ("fashion-mnist", "mnist")
CLASSES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(i) for i in range(10)],
}
DEFAULT_VAL_SIZE = 5000
SAMPLE = "fashion-mnist-sample"
SAMPLE_PATH = Path(__file__).resolve().parent / "samples" / "fashion-mnist-sample.npz"
SAMPLE_NOTE = "its accuracy is NOT comparable to published Fashion-MNIST figures"
IMAGE_EXTS = {".png", ".jpg", ".jpeg"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class DataNotFound(VggkitError):
    """A named dataset is neither on disk nor downloadable (the case allow_sample covers)."""


@dataclass
class Dataset:
    images: np.ndarray  # uint8, N x H x W x C
    labels: np.ndarray  # int64, N
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def subset(self, indices) -> "Dataset":
        indices = np.asarray(indices, dtype=np.int64)
        return Dataset(self.images[indices], self.labels[indices], self.classes)


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

    def describe(self) -> str:
        """One line for logs: sizes, image shape, origin."""
        _, h, w, c = self.train.images.shape
        test = f"{len(self.test):,}" if self.test is not None else "no"
        note = f" -- bundled sample, {SAMPLE_NOTE}" if self.is_sample else ""
        return (f"{self.name}: {len(self.train):,} train / {len(self.val):,} val / {test} test images, "
                f"{h}x{w}x{c}, {len(self.classes)} classes, from {self.source}{note}")


# ---------------------------------------------------------------- IDX files

def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not) as an array of its dimensions."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VggkitError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise VggkitError(f"{path} is a damaged or truncated gzip file ({e}); delete it and get it again") from None
    elif path.suffix == ".gz" and raw[:3] != b"\0\0\x08":
        raise VggkitError(f"{path} is not a gzip file (it starts with {raw[:4].hex() or 'nothing'}); "
                          "delete it and get it again")
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or not 1 <= raw[3] <= 4:
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


# ---------------------------------------------------------------- named datasets

def cache_dir(name: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "vggkit" / name


def search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Where a named dataset is looked for, in order."""
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir).expanduser(), Path(data_dir).expanduser() / name]
    if os.environ.get("VGGKIT_DATA"):
        dirs.append(Path(os.environ["VGGKIT_DATA"]).expanduser() / name)
    dirs.append(cache_dir(name))
    return list(dict.fromkeys(dirs))


def _find_files(directory: Path) -> dict[str, Path]:
    """The dataset files present in directory, gz or uncompressed, by their gz name."""
    found = {}
    for file in dl.FILES:
        for candidate in (directory / file, directory / file[:-3]):
            if candidate.is_file():
                found[file] = candidate
                break
    return found


def _load_named(name: str, data_dir, download: bool, mirrors, log) -> tuple[Dataset, Dataset, str]:
    searched = []
    for directory in search_dirs(name, data_dir):
        found = _find_files(directory)
        if len(found) == len(dl.FILES):
            return (*_read_named(name, found), f"{directory} ({_kind(found)})")
        missing = [f for f in dl.FILES if f not in found]
        searched.append(f"{directory} (missing {'all' if not found else ', '.join(missing)})")
    where = ", ".join(searched)
    cache = cache_dir(name)
    if not download:
        problem = "download disabled"
    else:
        present = _find_files(cache)
        log(f"{name} not found locally; downloading it into {cache}")
        try:
            mirror = dl.fetch(name, cache, [f for f in dl.FILES if f not in present], mirrors=mirrors, log=log)
        except dl.DownloadError as e:
            problem = f"download failed: {e}"
        else:
            return (*_read_named(name, _find_files(cache)), f"{cache} (gz files, downloaded from {mirror})")
    hint_url = (mirrors or dl.MIRRORS.get(name) or ["the dataset's site"])[0]
    raise DataNotFound(
        f"{name} not found: looked for {', '.join(dl.FILES)} (or uncompressed) in {where}; {problem}; "
        f"put the 4 files in one folder and pass it with --data-dir (or set $VGGKIT_DATA to a folder holding "
        f"{name}/), or download them by hand from {hint_url}")


def _kind(found: dict[str, Path]) -> str:
    return "gz files" if all(p.suffix == ".gz" for p in found.values()) else "IDX files"


def _read_named(name: str, found: dict[str, Path]) -> tuple[Dataset, Dataset]:
    classes = CLASSES[name]
    train = read_idx_pair(found[dl.FILES[0]], found[dl.FILES[1]], len(classes))
    test = read_idx_pair(found[dl.FILES[2]], found[dl.FILES[3]], len(classes))
    train.classes = test.classes = classes
    return train, test


def load_sample() -> tuple[Dataset, Dataset]:
    """The bundled Fashion-MNIST sample: 500 train + 100 test images per class."""
    with np.load(SAMPLE_PATH) as z:
        classes = CLASSES["fashion-mnist"]
        train = Dataset(z["train_images"][..., None], z["train_labels"].astype(np.int64), classes)
        test = Dataset(z["test_images"][..., None], z["test_labels"].astype(np.int64), classes)
    return train, test


# ---------------------------------------------------------------- image folders

def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image(path: Path) -> tuple[np.ndarray, bool]:
    """(pixels H x W x C, is_gray); raises OSError/ValueError-like errors for unreadable files."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        gray = im.mode in _GRAY_MODES
        im = im.convert("L" if gray else "RGB")
        array = np.asarray(im, dtype=np.uint8)
    return (array[..., None] if gray else array), gray


def _load_folder(root: Path, skip_bad: bool, log) -> tuple[dict[str, Dataset], list[str]]:
    """Datasets per tree ("train" and, if present, "val"/"test") with shared classes."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise VggkitError(f"{root}: no such folder; give fashion-mnist, mnist or a folder with one "
                          "sub-folder of images per class")
    trees = {"train": root}
    if (root / "train").is_dir():
        trees = {split: root / split for split in ("train", "val", "test") if (root / split).is_dir()}
    classes = [d.name for d in _class_dirs(trees["train"])]
    if not classes:
        hint = (" (it holds IDX files: use the dataset's name with --data-dir)" if _find_files(trees["train"])
                else "")
        raise VggkitError(f"{trees['train']} has no class sub-folders{hint}; expected one sub-folder of "
                          f"PNG/JPEG images per class, e.g. {trees['train']}/cat/001.png")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, tree in trees.items():
        files[split] = []
        for d in _class_dirs(tree):
            if d.name not in classes:
                raise VggkitError(f"{d} is not a class of {trees['train']} ({', '.join(classes)}); "
                                  "rename or remove it")
            images = _image_files(d)
            if not images:
                raise VggkitError(f"{d} holds no PNG/JPEG images; add some or remove the folder")
            files[split] += [(p, classes.index(d.name)) for p in images]

    pixels: dict[str, list[tuple[np.ndarray, int]]] = {split: [] for split in trees}
    bad, any_color = [], False
    for split, items in files.items():
        for path, label in items:
            try:
                array, gray = _read_image(path)
            except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
                bad.append(str(path.relative_to(root)))
                continue
            any_color |= not gray
            pixels[split].append((array, label))
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        if not skip_bad:
            raise VggkitError(f"{len(bad)} unreadable image(s) in {root}: {names}; remove or replace them, "
                              "or skip them with skip_bad=True (--skip-bad)")
        log(f"skipped {len(bad)} unreadable image(s) in {root}: {names}")
    for split in trees:
        present = {label for _, label in pixels[split]}
        wanted = {label for _, label in files[split]}
        if wanted - present:
            empty = ", ".join(classes[i] for i in sorted(wanted - present))
            raise VggkitError(f"no readable images left for class(es) {empty} in {trees[split]}; add some")

    sizes = Counter(a.shape[:2] for items in pixels.values() for a, _ in items)
    (h, w), _ = sizes.most_common(1)[0]
    total = sum(sizes.values())
    if len(sizes) > 1:
        log(f"note: {total - sizes[(h, w)]} of {total} images in {root} are not {w}x{h} (the most common size); "
            "resized them to it")
    datasets = {}
    for split, items in pixels.items():
        arrays = [_fit(a, h, w, 3 if any_color else 1) for a, _ in items]
        labels = np.array([label for _, label in items], dtype=np.int64)
        datasets[split] = Dataset(np.stack(arrays), labels, classes)
    return datasets, classes


def _fit(array: np.ndarray, h: int, w: int, channels: int) -> np.ndarray:
    from PIL import Image

    if array.shape[:2] != (h, w):
        im = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        array = np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8).reshape(h, w, -1)
    if array.shape[2] != channels:
        array = np.repeat(array, channels, axis=2)  # gray -> RGB, as PIL's convert does
    return array


# ---------------------------------------------------------------- splits and statistics

def stratified_indices(labels: np.ndarray, n: int, seed: int, salt: int = 0) -> np.ndarray:
    """n sorted indices drawn per class in proportion to class frequency (largest remainder), seeded."""
    labels = np.asarray(labels)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[: n - take.sum()]] += 1
    rng = np.random.default_rng([seed & 0xFFFFFFFF, salt])
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.cumsum(counts)[:-1])
    picked = [rng.permutation(g)[:k] for g, k in zip(groups, take)]
    return np.sort(np.concatenate(picked))


def split_off(dataset: Dataset, n: int, seed: int, salt: int = 1) -> tuple[Dataset, Dataset]:
    """(rest, part): a stratified part of n images and the rest, disjoint."""
    part = stratified_indices(dataset.labels, n, seed, salt)
    rest = np.setdiff1d(np.arange(len(dataset)), part, assume_unique=True)
    return dataset.subset(rest), dataset.subset(part)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images scaled to [0, 1] (via 256-bin histograms)."""
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(images.shape[3]):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        total = hist.sum()
        mean = (hist @ values) / total if total else 0.0
        var = (hist @ (values - mean) ** 2) / total if total else 0.0
        means.append(round(float(mean), 6))
        stds.append(round(float(np.sqrt(var)) or 1.0, 6))  # a constant channel would divide by 0
    return tuple(means), tuple(stds)


def _positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise VggkitError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------- entry point

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
    val_tree = None
    if key in NAMED or key == SAMPLE:
        name, is_sample = ("fashion-mnist" if key == SAMPLE else key), key == SAMPLE
        classes = CLASSES[name]
        if not is_sample:
            try:
                train, test, source = _load_named(name, data_dir, download, mirrors, log)
            except DataNotFound as e:
                if not (allow_sample and name == "fashion-mnist"):
                    raise
                log(f"{e}")
                log(f"falling back to the bundled Fashion-MNIST sample (5,000 train + 1,000 test images): "
                    f"{SAMPLE_NOTE}")
                is_sample = True
        if is_sample:
            train, test = load_sample()
            source = "bundled sample (500 train + 100 test images per class of Fashion-MNIST)"
        default_val = len(train) // 10 if is_sample else DEFAULT_VAL_SIZE
    elif os.sep in str(data) or "/" in str(data) or Path(data).expanduser().exists():
        root = Path(data).expanduser()
        trees, classes = _load_folder(root, skip_bad, log)
        name, is_sample, train, test, val_tree = str(data), False, trees["train"], trees.get("test"), trees.get("val")
        _, h, w, c = train.images.shape
        n = sum(len(d) for d in trees.values())
        source = f"{root} (image folder, {n:,} images, {w}x{h}, {'RGB' if c == 3 else 'grayscale'})"
        default_val = len(train) // 10
        if val_tree is not None and val_size:  # 0 (e.g. from evaluate) needs no note
            log(f"note: {root}/val exists, so val_size={val_size} is ignored")
    else:
        raise VggkitError(f"unknown dataset {data!r}: use fashion-mnist, mnist, {SAMPLE} or the path of an "
                          "image folder")

    if val_tree is not None:
        val = val_tree
    else:
        n_val = default_val if val_size is None else int(val_size)
        if n_val >= len(train):
            raise VggkitError(f"val_size {n_val:,} leaves no training images ({name} has {len(train):,}); "
                              "use a smaller val_size")
        train, val = split_off(train, n_val, seed, salt=1)
    if limit is not None and limit < len(train):
        train = train.subset(stratified_indices(train.labels, limit, seed, salt=2))
    if test is not None and test_limit is not None and test_limit < len(test):
        test = test.subset(stratified_indices(test.labels, test_limit, seed, salt=3))
    mean, std = channel_stats(train.images)
    return DataSplits(name=name, train=train, val=val, test=test, classes=list(classes), source=source,
                      is_sample=is_sample, mean=mean, std=std)
