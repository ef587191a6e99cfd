"""Data pipeline throughput: loading Fashion-MNIST and producing training batches on the CPU.

    .venv/bin/python benchmarks/bench_data.py [--data-dir DIR] [--runs 5]

Each figure is the median of --runs runs, with torch.set_num_threads(2).
(a) reading the four gz files (60k + 10k images);      target < 2 s
(b) batches of 128 at 224x224: resize + normalize + flip; target >= 5,000 images/s
(c) batches of 512 at 28x28: normalize + flip;           target >= 100,000 images/s
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from vggkit.data import load_data, read_idx_pair
from vggkit.pipeline import Augment, BatchLoader

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("VGGKIT_TEST_DATA", ROOT.parent / "shared" / "data" / "fashion-mnist"))


def cpu_name() -> str:
    import torch

    from vggkit.bench import device_name
    return device_name(torch.device("cpu"))


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(loader: BatchLoader, batches: int, runs: int) -> float:
    """Median images/s over `runs` passes of `batches` batches (a different epoch each pass)."""
    next(iter(loader))  # warm-up
    rates = []
    for run in range(runs):
        loader.set_epoch(run)
        images, start = 0, time.perf_counter()
        for i, (x, _) in enumerate(loader):
            images += len(x)
            if i + 1 == batches:
                break
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    d = args.data_dir

    def read_all():
        read_idx_pair(d / "train-images-idx3-ubyte.gz", d / "train-labels-idx1-ubyte.gz", 10)
        read_idx_pair(d / "t10k-images-idx3-ubyte.gz", d / "t10k-labels-idx1-ubyte.gz", 10)

    rows = [("(a) read the 4 gz files (70k images)", median_time(read_all, args.runs), "s", "< 2 s")]
    splits = None

    def full_load():
        nonlocal splits
        splits = load_data(data_dir=d, download=False, log=lambda *_: None)

    rows.append(("    load_data: read + 55k/5k split + mean/std", median_time(full_load, args.runs), "s", ""))
    flip = Augment(flip=True)
    common = dict(mean=splits.mean, std=splits.std, shuffle=True, drop_last=True, augment=flip)
    big = BatchLoader(splits.train, 128, input_size=224, **common)
    rows.append(("(b) 224x224, batch 128: resize + normalize + flip", throughput(big, 40, args.runs), "img/s",
                 ">= 5,000"))
    rgb = BatchLoader(splits.train, 128, input_size=224, out_channels=3, **common)
    rows.append(("    same, gray repeated to 3 channels", throughput(rgb, 40, args.runs), "img/s", ""))
    small = BatchLoader(splits.train, 512, input_size=28, **common)
    rows.append(("(c) 28x28, batch 512: normalize + flip", throughput(small, len(small), args.runs), "img/s",
                 ">= 100,000"))
    heavy = BatchLoader(splits.train, 512, input_size=28, **{**common, "augment": Augment(4, True, 0.5)})
    rows.append(("    same + crop (pad 4) + erasing 0.5", throughput(heavy, len(heavy), args.runs), "img/s", ""))

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, 2 threads; "
          f"median of {args.runs} runs")
    print(f"{'measure':52} {'median':>10} {'unit':6} target")
    for name, value, unit, target in rows:
        shown = f"{value:.3f}" if unit == "s" else f"{value:,.0f}"
        print(f"{name:52} {shown:>10} {unit:6} {target}")


if __name__ == "__main__":
    main()
