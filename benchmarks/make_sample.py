"""Regenerate src/vggkit/samples/fashion-mnist-sample.npz from the Fashion-MNIST gz files.

    .venv/bin/python benchmarks/make_sample.py [DIR]   (default: ../shared/data/fashion-mnist)

A seeded, class-balanced sample: 500 training images per class from the training file and
100 test images per class from the test file.
"""
import sys
from pathlib import Path

import numpy as np

from vggkit.data import REGISTRY, SAMPLE_PATH, read_idx_pair, stratified_indices

ROOT = Path(__file__).resolve().parent.parent
src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "fashion-mnist"
train_images, train_labels, test_images, test_labels = (src / f for f in REGISTRY["fashion-mnist"].files)
train = read_idx_pair(train_images, train_labels, 10)
test = read_idx_pair(test_images, test_labels, 10)
train = train.subset(stratified_indices(train.labels, 5000, seed=20240601))
test = test.subset(stratified_indices(test.labels, 1000, seed=20240601))
assert (np.bincount(train.labels) == 500).all() and (np.bincount(test.labels) == 100).all()
SAMPLE_PATH.parent.mkdir(exist_ok=True)
np.savez_compressed(SAMPLE_PATH, train_images=train.images[..., 0], train_labels=train.labels.astype(np.uint8),
                    test_images=test.images[..., 0], test_labels=test.labels.astype(np.uint8))
print(f"wrote {SAMPLE_PATH} ({SAMPLE_PATH.stat().st_size / 1e6:.2f} MB)")
