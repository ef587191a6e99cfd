"""carve: the validation split and the --limit cap of splits loaded with neither (load_data(val_size=0)).

Training decides the validation size from the data (decide.py), so it loads first and carves
after. The draws are load_data's own (same salts, same order: validation first, then the
limit on what is left), so `carve(load_data(d, val_size=0), n, limit, seed)` and
`load_data(d, val_size=n, limit=limit, seed=seed)` hold the same images.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import VggkitError
from .dataset import Dataset, DataSplits, split_off, stats_of, stratified_indices

VAL_SALT, LIMIT_SALT = 1, 2  # independent seeded draws (load.py has those of the test split)


def carve_train(train: Dataset, val: Dataset | None, val_size: int, limit: int | None, seed: int,
                held_out: bool = False) -> tuple[Dataset, Dataset]:
    """(train, val): val_size training images moved to validation where there is none yet (val None
    or empty), then the training images capped at `limit`. The draws of load_data and carve alike."""
    if val is None or (not len(val) and val_size):
        train, val = split_off(train, val_size, seed, VAL_SALT, held_out=held_out)
    if limit is not None and limit < len(train):
        train = train.subset(stratified_indices(train.labels, limit, seed, LIMIT_SALT))
    return train, val


def carve(splits: DataSplits, val_size: int, limit: int | None, seed: int) -> DataSplits:
    """`splits` with val_size training images moved to validation (unless it has a val/ tree already),
    then the training images capped at `limit`; the channel statistics are those of the new train."""
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1):
        raise VggkitError(f"limit must be a positive integer, got {limit!r}")
    train, val = carve_train(splits.train, splits.val, val_size, limit, seed)
    if train is splits.train:
        return splits
    mean, std = stats_of(train)
    return replace(splits, train=train, val=val, mean=mean, std=std)
