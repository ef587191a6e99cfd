"""CIFAR-10 and CIFAR-100 in their binary version (no pickle): fixed-size records.

A record is its label bytes (CIFAR-10: the class; CIFAR-100: coarse then fine) and 3,072 pixel
bytes: the red 32x32 plane, then green, then blue, each row by row. A reader takes the archive's
members as archive.py delivers them: the train record files, the test record file, then the
class names file (one name a line) or None, in which case the built-in names are used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import VggkitError
from .archive import Member
from .dataset import Dataset

SIDE = 32
PIXELS = 3 * SIDE * SIDE  # bytes of one image: three planes


@dataclass(frozen=True)
class CifarFormat:
    """One CIFAR version's records; an instance is the registry entry's reader."""
    title: str  # "CIFAR-10", for messages
    label_classes: tuple[int, ...]  # classes of each label byte of a record, in order
    label: int  # which label byte is the class
    counts: tuple[int, int] | None = (50_000, 10_000)  # the official train / test records; None: any

    @property
    def record_size(self) -> int:
        return len(self.label_classes) + PIXELS

    def member_limits(self, archive) -> dict[str, tuple[int, str]]:
        """(the most bytes, what they are) each record file of `archive` (archive.Archive: train files,
        then the test file) may hold: the split's records (counts None: what the machine can hold)."""
        from ..bounds import memory_limit

        *train, test = archive.members
        limits = []
        for count, split in zip(self.counts or (None, None), ("train", "test")):
            if count is None:
                limit = memory_limit()
                limits.append((limit.bytes, limit.what))
            else:
                limits.append((count * self.record_size,
                               f"{self.title}'s {count:,} {split} records of {self.record_size:,} bytes"))
        return {**{name: limits[0] for name in train}, test: limits[1]}

    def __call__(self, members: list[Member | None], classes: list[str]) -> tuple[Dataset, Dataset]:
        *train_files, test_file, names_file = members
        classes = class_names(names_file, classes)
        splits = []
        for files, split in ((train_files, 0), ([test_file], 1)):
            parts = [self.read_records(f) for f in files]
            self._check_count(files, [len(labels) for _, labels in parts], split)
            images, labels = (np.concatenate(p) for p in zip(*parts))
            splits.append(Dataset(images, labels, list(classes)))
        return splits[0], splits[1]

    def read_records(self, member: Member) -> tuple[np.ndarray, np.ndarray]:
        """(images N x 32 x 32 x 3 uint8, class labels N int64) of one record file."""
        size, data = self.record_size, member.data
        if not data:
            raise VggkitError(f"{member.where} is empty; delete {member.source} and get it again")
        if len(data) % size:
            raise VggkitError(f"{member.where} is truncated or not a {self.title} record file ({len(data):,} bytes, "
                              f"not a multiple of its {size:,}-byte records{self._other_format(len(data))}); "
                              f"delete {member.source} and get it again")
        records = np.frombuffer(data, np.uint8).reshape(-1, size)
        for column, limit in enumerate(self.label_classes):
            self._check_labels(member, records[:, column], limit)
        images = records[:, len(self.label_classes):].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), records[:, self.label].astype(np.int64)

    def _check_labels(self, member: Member, labels: np.ndarray, limit: int) -> None:
        bad = np.flatnonzero(labels >= limit)
        if len(bad):
            more = f" (and {len(bad) - 1:,} more)" if len(bad) > 1 else ""
            raise VggkitError(f"{member.where}: record {bad[0]:,} has label {labels[bad[0]]}, out of range for "
                              f"{limit} classes{more}; it is damaged or not a {self.title} file: delete "
                              f"{member.source} and get it again")

    def _check_count(self, files: list[Member], counts: list[int], split: int) -> None:
        if self.counts is None or sum(counts) == self.counts[split]:
            return
        found = ", ".join(f"{f.name} {n:,}" for f, n in zip(files, counts))
        # the archive, or the folder of the extracted files
        holders = " and ".join(sorted({str(f.source if f.source.name != f.name else f.source.parent) for f in files}))
        raise VggkitError(f"{holders}: {self.title} has {self.counts[split]:,} {('train', 'test')[split]} records, "
                          f"found {sum(counts):,} ({found}); a file is cut short or not the official one: get it "
                          "again")

    def _other_format(self, size: int) -> str:
        """A hint when the size fits the other CIFAR version's records."""
        other = PIXELS + (2 if len(self.label_classes) == 1 else 1)
        return f"; it fits {other:,}-byte records: is it the other CIFAR version?" if size % other == 0 else ""


def class_names(member: Member | None, builtin: list[str]) -> list[str]:
    """The names listed in member (one a line, blank lines ignored), or the built-in ones without it."""
    if member is None:
        return list(builtin)
    try:
        names = [line.strip() for line in member.data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        names = []
    if len(names) != len(builtin):
        raise VggkitError(f"{member.where} lists {len(names)} class names, expected {len(builtin)} (one a line); "
                          f"delete {member.source} and get it again")
    return names
