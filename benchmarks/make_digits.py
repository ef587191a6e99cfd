"""Write scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as an image folder of PNGs.

    .venv/bin/python benchmarks/make_digits.py OUT [--split]     (needs: pip install scikit-learn)

OUT/<digit>/<index>.png, one sub-folder per class: a flat folder, the way a user's own data
comes. With --split, OUT/train/<digit>/ and OUT/test/<digit>/ instead, the test tree a seeded,
class-balanced 10% (for vggkit versions that carve no held-out test split from a flat folder).
Then: vggkit train --data OUT   (no other flags: the point is what vggkit decides by itself).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from vggkit.data import stratified_indices

TEST_FRACTION, SEED = 0.1, 0


def digits_as_uint8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # the data ships inside the package: nothing is downloaded

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    return images, digits.target.astype(np.int64)


def write_folder(out: Path, split: bool = False) -> int:
    """Write the PNGs under `out`; returns how many."""
    images, labels = digits_as_uint8()
    tree = {i: out for i in range(len(labels))}
    if split:
        test = set(stratified_indices(labels, round(len(labels) * TEST_FRACTION), SEED).tolist())
        tree = {i: out / ("test" if i in test else "train") for i in range(len(labels))}
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tree[i] / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write (created)")
    parser.add_argument("--split", action="store_true", help="write train/ and test/ trees (10%% test)")
    args = parser.parse_args()
    n = write_folder(args.out, args.split)
    print(f"wrote {n} PNGs under {args.out}")


if __name__ == "__main__":
    main()
