"""The named datasets: for each, its files with their MD5, where to download them, how to read them.

A new named dataset is one entry of REGISTRY (plus, if its files are not IDX, one reader in its
own module). The files are looked for locally gz or uncompressed (see named.py) and downloaded
as listed, into the cache, verified by MD5 (see download.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .dataset import Dataset
from .idx import read_idx_splits

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# reader(paths of `files` in their order, classes) -> (train, test)
Reader = Callable[[list[Path], list[str]], tuple[Dataset, Dataset]]


@dataclass(frozen=True)
class NamedDataset:
    name: str
    classes: tuple[str, ...]
    md5: dict[str, str]  # file name (as downloaded) -> MD5; its order is the order the reader expects
    mirrors: tuple[str, ...]  # base URLs, tried in order
    reader: Reader
    val_size: int = 5000  # default number of train images carved off for validation
    flips_safe: bool = True  # whether a horizontally mirrored image is still an image of its class

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.md5)


REGISTRY: dict[str, NamedDataset] = {entry.name: entry for entry in (
    NamedDataset(
        name="fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        md5=dict(zip(IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                 "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
        reader=read_idx_splits,
    ),
    NamedDataset(
        name="mnist",
        classes=tuple(str(i) for i in range(10)),
        md5=dict(zip(IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                 "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        reader=read_idx_splits,
        flips_safe=False,  # a mirrored digit is not a digit (and 2/5 look alike mirrored)
    ),
)}

