"""Write a folder of camera-size JPEG photos, one sub-folder per class, for the photo benchmarks.

    .venv/bin/python benchmarks/make_photos.py OUT --per-class 100 --size 3000x2000 [--mixed]

Each class is one real photograph (scikit-learn's china.jpg and flower.jpg, matplotlib's
grace_hopper.jpg: they ship inside the packages, nothing is downloaded). Each image is a random
region of it (a quarter to all of its area), resized to the size asked for, brightness-jittered,
with sensor-like noise so that the JPEG is about as large as a camera's (3000x2000: ~0.3-1 MB).
--mixed draws every image's size between a third of and the size given, landscape or portrait,
as a folder of phone and camera photos would be. Writing 300 images of 3000x2000 takes a minute.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image


def sources() -> dict[str, str]:
    import matplotlib
    from sklearn.datasets import load_sample_images

    found = dict(zip(("china", "flower"), load_sample_images().filenames))
    found["grace_hopper"] = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return found


def photo(source: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random region of `source` at size (w, h), jittered and noisy."""
    w, h = size
    area = rng.uniform(0.25, 1.0) * source.width * source.height
    crop_h = min(source.height, int(np.sqrt(area * h / w)))
    crop_w = min(source.width, int(crop_h * w / h))
    left = int(rng.integers(0, source.width - crop_w + 1))
    top = int(rng.integers(0, source.height - crop_h + 1))
    region = source.crop((left, top, left + crop_w, top + crop_h)).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(region, dtype=np.float32) * rng.uniform(0.7, 1.3)
    pixels += rng.normal(0, 2, size=(h, w, 1)).astype(np.float32)  # same noise on every channel: cheap, JPEG-sized
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_folder(out: Path, per_class: int, size: tuple[int, int], mixed: bool = False, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    count = 0
    for name, path in sources().items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as source:
            source = source.convert("RGB")
            for i in range(per_class):
                w, h = size
                if mixed:
                    scale = rng.uniform(1 / 3, 1.0)
                    w, h = max(16, int(w * scale)), max(16, int(h * scale))
                    if rng.random() < 0.3:
                        w, h = h, w  # portrait
                photo(source, (w, h), rng).save(folder / f"{i:05d}.jpg", quality=90)
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", default="3000x2000", help="WIDTHxHEIGHT")
    parser.add_argument("--mixed", action="store_true", help="sizes drawn between a third of --size and --size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    w, h = (int(n) for n in args.size.lower().split("x"))
    n = write_folder(args.out, args.per_class, (w, h), args.mixed, args.seed)
    print(f"wrote {n} JPEGs under {args.out}")


if __name__ == "__main__":
    main()
