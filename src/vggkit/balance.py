"""Imbalanced classes: when a training set counts as imbalanced, and the two remedies (--balance).

    imbalanced  the largest class has IMBALANCE_RATIO (3) times the images of the smallest or more: a
                model answering only the largest class then already scores 75% on two such classes,
                while its balanced accuracy (evaluate) is 50%
    weights     each image's loss weighted by n / (classes x n_c) (sklearn's class_weight="balanced"):
                every class carries the same share of the loss, and the mean weight over the training
                set is 1, so the learning rate means what it did
    sampling    each epoch draws its n images with replacement, each with probability 1 / (classes x n_c):
                every class is seen equally often; the draw is a pure function of (seed, epoch), as
                pipeline.epoch_order, so resume and every rank see the same order
    off         the plain loss and order

"auto" (the default) is decide.decide_balance: AUTO_REMEDY on imbalanced data, off otherwise.
"""
from __future__ import annotations

import numpy as np
import torch

IMBALANCE_RATIO = 3
REMEDIES = ("weights", "sampling")
BALANCE_CHOICES = ("auto", *REMEDIES, "off")
# on a 20:1 folder (benchmarks/bench_imbalance.py, BENCHMARKS.md) sampling raised balanced accuracy
# (median of 3 seeds 0.698, off 0.636), the weighted loss did not (0.631)
AUTO_REMEDY = "sampling"
DESCRIBED = {"weights": "class-weighted loss", "sampling": "class-balanced sampling", "off": "no balancing"}


def class_counts(labels, classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes)


def imbalance(counts) -> tuple[int, int] | None:
    """(largest, smallest) class counts where they are IMBALANCE_RATIO apart or more, else None.
    A class without training images is left out (the smallest is of the classes that have some)."""
    counts = [int(c) for c in counts if c > 0]
    if len(counts) < 2 or max(counts) < IMBALANCE_RATIO * min(counts):
        return None
    return max(counts), min(counts)


def class_weights(labels, classes: int) -> torch.Tensor:
    """Per-class loss weights n / (classes x n_c) (0 for a class without images), float32."""
    counts = class_counts(labels, classes)
    present = counts > 0
    weights = np.zeros(classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights(labels, classes: int) -> torch.Tensor:
    """Each image's chance of being drawn for class-balanced sampling, float64, summing to 1."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = class_counts(labels, classes)
    per_image = 1.0 / counts[labels]
    return torch.from_numpy(per_image / per_image.sum())
