"""The bundled Fashion-MNIST sample: 500 train + 100 test images per class, for runs without the data."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import Dataset
from .registry import REGISTRY

SAMPLE = "fashion-mnist-sample"
SAMPLE_OF = "fashion-mnist"  # the named dataset it is drawn from (and may stand in for)
SAMPLE_PATH = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist-sample.npz"
SAMPLE_SOURCE = "bundled sample (500 train + 100 test images per class of Fashion-MNIST)"


def load_sample() -> tuple[Dataset, Dataset]:
    """(train, test) of the bundled sample."""
    classes = list(REGISTRY[SAMPLE_OF].classes)
    with np.load(SAMPLE_PATH) as z:
        train = Dataset(z["train_images"][..., None], z["train_labels"].astype(np.int64), classes)
        test = Dataset(z["test_images"][..., None], z["test_labels"].astype(np.int64), classes)
    return train, test
