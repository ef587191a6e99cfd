"""Transfer: does a Fashion-MNIST VGG help on a small other data set?

Trains the fast recipe on Fashion-MNIST once, then for each seed
  - fine-tunes it on 500 images of scikit-learn's digits (50 per class, upscaled from 8x8) with
    its features frozen (`--init RUN --freeze features`), and
  - trains the same architecture from scratch on the same 500 images for the same wall time
    (epochs chosen from a one-epoch probe so that the whole run takes as long as the fine-tuning),
and reports the test accuracy on the other 1,297 digits: median over the seeds, as a markdown row.

    .venv/bin/python benchmarks/bench_transfer.py [--pretrain-epochs 4] [--seeds 0,1,2] [--threads N]
    .venv/bin/python benchmarks/bench_transfer.py --quick   # a tiny setting to check the script runs

Needs scikit-learn (`pip install scikit-learn`) and Fashion-MNIST ($VGGKIT_DATA or the download;
--quick uses the bundled sample). Time it alone on the machine: the budget is wall time.
"""
import argparse
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import vggkit

TRAIN_PER_CLASS = 50  # 500 training images
SPLIT_SEED = 0  # the same 500 images for every seed; the seeds change initialisation and order
BATCH_SIZE = 32  # 15 steps an epoch on 500 images (the recipe's 256 would give one)


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as PNG folders: train/<class>/ (50 a class) and test/<class>/ (the rest)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("bench_transfer needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 17 gray levels -> 0..255
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    taken = dict.fromkeys(range(10), 0)
    for index in order:
        label = int(digits.target[index])
        split = "train" if taken[label] < TRAIN_PER_CLASS else "test"
        taken[label] += split == "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], mode="L").save(folder / f"{index:04d}.png")
    return root


def run(settings: dict, out: Path, name: str, threads: int | None):
    """vggkit.train quietly; returns its History."""
    config = {**settings, "out": str(out), "name": name, "threads": threads}
    return vggkit.train({k: v for k, v in config.items() if v is not None}, progress="none", log=lambda *a: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny settings (sample data, 1 seed): checks the script")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    pretrain = {"preset": "fast", "epochs": args.pretrain_epochs}
    if args.quick:
        pretrain = {"preset": "fast", "epochs": 1, "data": "fashion-mnist-sample", "limit": 512, "test_limit": 200}
        args.finetune_epochs, seeds = 2, seeds[:1]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits = str(write_digits(tmp / "digits"))
        source = run(pretrain, tmp, "fashion-mnist", args.threads)
        print(f"pretrained on fashion-mnist: test acc {source.test_acc:.4f} in {source.seconds:.1f} s", flush=True)
        # no validation split (the 500 images all train), the test set evaluated once at the end
        task = {"data": digits, "input_size": 28, "batch_size": BATCH_SIZE, "val_size": 0, "flip": False,
                "eval_every_epoch_on_test": False}
        tuned, scratch = [], []
        for seed in seeds:
            ft = run({**task, "init_from": str(source.run_dir), "freeze": "features", "epochs": args.finetune_epochs,
                      "seed": seed}, tmp, f"finetune-{seed}", args.threads)
            epochs = scratch_epochs(task, seed, ft.seconds, tmp, args.threads)
            sc = run({**task, "epochs": epochs, "seed": seed}, tmp, f"scratch-{seed}", args.threads)
            print(f"seed {seed}: fine-tuned {ft.test_acc:.4f} ({args.finetune_epochs} epochs, {ft.seconds:.1f} s); "
                  f"from scratch {sc.test_acc:.4f} ({epochs} epochs, {sc.seconds:.1f} s)", flush=True)
            tuned.append((ft.test_acc, ft.seconds))
            scratch.append((sc.test_acc, sc.seconds, epochs))

    print("\n| pretraining | digits train / test | fine-tuned, frozen features | from scratch, same time | seeds |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| fast recipe, {pretrain['epochs']} epochs ({source.test_acc:.2%} test) | 500 / 1,297 "
          f"| {statistics.median(a for a, _ in tuned):.2%} ({statistics.median(s for _, s in tuned):.0f} s) "
          f"| {statistics.median(a for a, _, _ in scratch):.2%} ({statistics.median(s for _, s, _ in scratch):.0f} s, "
          f"{statistics.median(e for _, _, e in scratch):.0f} epochs) | {len(seeds)} (medians) |")


def scratch_epochs(task: dict, seed: int, budget: float, out: Path, threads: int | None) -> int:
    """The epochs a from-scratch run can do in `budget` seconds, from a one-epoch probe (set-up + one epoch)."""
    probe = run({**task, "epochs": 1, "seed": seed}, out, f"probe-{seed}", threads)
    epoch = probe.epochs[0]["seconds"]
    set_up = max(probe.seconds - epoch, 0.0)
    return max(1, math.floor((budget - set_up) / epoch))


if __name__ == "__main__":
    main()
