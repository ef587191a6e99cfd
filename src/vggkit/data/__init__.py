"""Datasets in memory: named datasets (Fashion-MNIST, MNIST, CIFAR-10/100: found locally or
downloaded), image folders, the bundled Fashion-MNIST sample, and seeded class-balanced splits.

    dataset.py   Dataset, DataSplits, stratified splits, channel statistics
    registry.py  the named datasets: files, MD5s, mirrors, reader, classes, defaults
    named.py     finding a named dataset's files on disk, or downloading them into the cache
    download.py  mirrors, MD5, atomic downloads (download_file, fetch)
    idx.py       IDX files          folder.py  image folders          sample.py  the bundled sample
    archive.py   tar archives (or their extracted folder): members read by name, never extracted
    cifar.py     CIFAR-10/100 binary records
    load.py      load_data: one of the sources above, then val / limit / statistics
"""
from .archive import Archive, Member
from .cifar import CifarFormat
from .dataset import SAMPLE_NOTE, Dataset, DataSplits, channel_stats, split_off, stratified_indices
from .idx import IdxFormat, read_idx, read_idx_pair
from .load import load_data
from .named import DataNotFound, cache_dir, search_dirs
from .registry import REGISTRY, NamedDataset
from .sample import SAMPLE, SAMPLE_PATH, load_sample

__all__ = [
    "Archive", "CifarFormat", "Dataset", "DataSplits", "DataNotFound", "IdxFormat", "Member", "NamedDataset",
    "REGISTRY",
    "SAMPLE", "SAMPLE_NOTE", "SAMPLE_PATH",
    "cache_dir", "channel_stats", "load_data", "load_sample", "read_idx", "read_idx_pair",
    "search_dirs", "split_off", "stratified_indices",
]
