"""Data sets that are not Fashion-MNIST, built from real images that ship with installed packages,
for the no-flag runs of BENCHMARKS.md ("Your own data: no-flag runs").

    python benchmarks/own_data.py build OUT          # writes OUT/digits, OUT/photos, OUT/digits-idx
    python benchmarks/own_data.py run OUT --runs 3   # `vggkit train --data ...` with no other flag, each

- digits: scikit-learn's 1,797 handwritten digits (8x8, 17 gray levels) as a flat folder of PNGs,
  one sub-folder per class (no train/ or test/ trees: vggkit holds out its own splits).
- photos: 3 classes of RGB JPEG crops of mixed sizes (50..300 x 50..200 pixels) from three
  photographs: scikit-learn's china.jpg and flower.jpg and matplotlib's grace_hopper.jpg, 60 each.
- digits-idx: the digits upscaled to 28x28 (bilinear) as MNIST-style IDX files (gz), 1,597 train and
  200 test, read with `--data mnist --data-dir OUT/digits-idx`.
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build_digits(root: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(folder / f"{i:04d}.png")


def build_photos(root: Path, per_class: int = 60, seed: int = 0) -> None:
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sources = dict(zip(("china", "flower"), load_sample_images().filenames))
    sources["grace_hopper"] = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    rng = np.random.default_rng(seed)
    for name, path in sources.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
            for i in range(per_class):
                w, h = int(rng.integers(50, 301)), int(rng.integers(50, 201))
                side = int(rng.integers(max(w, h), min(photo.size) + 1))  # a square region, squashed to w x h
                left = int(rng.integers(0, photo.width - side + 1))
                top = int(rng.integers(0, photo.height - side + 1))
                crop = photo.crop((left, top, left + side, top + side)).resize((w, h), Image.BILINEAR)
                crop.save(folder / f"{i:03d}.jpg", quality=90)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def build_digits_idx(root: Path, test: int = 200, seed: int = 0) -> None:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images * 255 / 16).float()[:, None]
    images = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).round().clamp(0, 255)
    images = images[:, 0].numpy().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    root.mkdir(parents=True, exist_ok=True)
    for prefix, idx in (("train", order[test:]), ("t10k", order[:test])):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[idx])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", digits.target[idx])


DATASETS = {
    "digits (flat folder, 8x8 gray PNG)": lambda out: ["--data", str(out / "digits")],
    "photos (3 classes, RGB JPEG 50-300 px)": lambda out: ["--data", str(out / "photos")],
    "digits as IDX files (28x28)": lambda out: ["--data", "mnist", "--data-dir", str(out / "digits-idx")],
}


def run(out: Path, runs: int, vggkit: str) -> None:
    """Each data set `runs` times in a fresh process, no flags but the data; a markdown table."""
    rows = []
    for label, data_args in DATASETS.items():
        walls, accs, header, closing = [], [], "", ""
        for r in range(runs):
            cmd = [vggkit, "train", *data_args(out), "--out", str(out / "runs"), "--name", f"r{r}-{abs(hash(label))}",
                   "--overwrite"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            walls.append(time.perf_counter() - start)
            if proc.returncode:
                sys.exit(f"{label}: exit {proc.returncode}\n{proc.stderr}")
            lines = proc.stdout.strip().splitlines()
            header = "; ".join(l for l in lines[:3] if not l.startswith("epoch"))
            closing = lines[-2] if len(lines) > 1 else ""
            found = re.findall(r"test acc(?:uracy)? (0\.\d+|1\.0+)", "\n".join(lines[-3:]))
            accs.append(float(found[0]) if found else float("nan"))
            print(f"{label} run {r + 1}: {walls[-1]:.1f} s, test acc {accs[-1]:.4f}", file=sys.stderr)
        rows.append((label, statistics.median(accs), statistics.median(walls), min(walls), max(walls), header, closing))
    print("| data | test accuracy (median) | wall s, median (min-max) | what vggkit decided (header) |")
    print("| --- | --- | --- | --- |")
    for label, acc, wall, lo, hi, header, _ in rows:
        print(f"| {label} | {100 * acc:.2f}% | {wall:.1f} ({lo:.1f}-{hi:.1f}) | {header} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("build", "run"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vggkit", default=str(Path(sys.executable).with_name("vggkit")))
    args = parser.parse_args()
    if args.what == "build":
        build_digits(args.out / "digits")
        build_photos(args.out / "photos")
        build_digits_idx(args.out / "digits-idx")
        print(f"wrote {args.out}/digits, photos, digits-idx")
    else:
        run(args.out, args.runs, args.vggkit)


if __name__ == "__main__":
    main()
