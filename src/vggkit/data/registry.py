"""The named datasets: for each, its files with their MD5, where to download them, how to read them.

A new named dataset is one entry of REGISTRY (plus, if its files are not IDX, one reader in its
own module). The files are looked for locally gz or uncompressed (see named.py) and downloaded
as listed, into the cache, verified by MD5 (see download.py). A dataset shipped as one tar
archive (CIFAR) lists that archive as its one file and says in `archive` which members its reader
takes; it is found as the archive or as its extracted folder (see archive.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .archive import Archive
from .cifar import CifarFormat
from .dataset import Dataset
from .idx import IdxFormat

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# reader(paths of `files` in their order, classes) -> (train, test); for an archive dataset the
# members of archive.files in their order (archive.Member, or None for an absent optional one)
Reader = Callable[[list, list[str]], tuple[Dataset, Dataset]]

CIFAR_SITE = "https://www.cs.toronto.edu/~kriz/"  # the authors' site
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())  # the fine labels


@dataclass(frozen=True)
class NamedDataset:
    name: str
    classes: tuple[str, ...]
    md5: dict[str, str]  # file name (as downloaded) -> MD5; its order is the order the reader expects
    mirrors: tuple[str, ...]  # base URLs, tried in order
    reader: Reader
    val_size: int = 5000  # default number of train images carved off for validation
    flips_safe: bool = True  # whether a horizontally mirrored image is still an image of its class
    archive: Archive | None = None  # set when the one file of md5 is a tar archive holding these members

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
        reader=IdxFormat("Fashion-MNIST"),
    ),
    NamedDataset(
        name="mnist",
        classes=tuple(str(i) for i in range(10)),
        md5=dict(zip(IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                 "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        reader=IdxFormat("MNIST"),
        flips_safe=False,  # a mirrored digit is not a digit (and 2/5 look alike mirrored)
    ),
    NamedDataset(
        name="cifar10",
        classes=CIFAR10_CLASSES,
        md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        mirrors=(CIFAR_SITE,),
        reader=CifarFormat("CIFAR-10", label_classes=(10,), label=0),
        archive=Archive("cifar-10-batches-bin", (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"),
                        optional=("batches.meta.txt",)),
    ),
    NamedDataset(
        name="cifar100",
        classes=CIFAR100_CLASSES,
        md5={"cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8"},
        mirrors=(CIFAR_SITE,),
        # records hold the coarse label (20 superclasses), then the fine one (100 classes): fine is the class
        reader=CifarFormat("CIFAR-100", label_classes=(20, 100), label=1),
        archive=Archive("cifar-100-binary", ("train.bin", "test.bin"), optional=("fine_label_names.txt",)),
    ),
)}
