"""Imbalanced classes: balanced accuracy of `vggkit train --data FOLDER --balance MODE` (off, weights,
sampling) on a 20:1 folder, over seeds, evaluated on a balanced test tree (BENCHMARKS.md, "Imbalanced classes").

    VGGKIT_DATA=DIR .venv/bin/python benchmarks/bench_imbalance.py OUT [--seeds 0,1,2] [--modes off,weights,sampling]

OUT/folder/train/<class>/ holds Fashion-MNIST's T-shirt/top and Pullover, 400 training images each,
and Shirt, 20 (20 times rarer: the class the other two are mistaken for most); OUT/folder/test/ holds
300 test images of each. Each run is `vggkit train --arch 1x16,1x32,1x64 --fc-width 64 --epochs 8
--no-eval-every-epoch-on-test` (FLAGS: a small network, few epochs) with --balance and --seed (the rest
decided from the data), then `vggkit evaluate` of its best checkpoint on the test tree. The table gives
the median over the seeds of balanced accuracy (the mean of the per-class recalls), accuracy,
macro F1 and the rare class's recall; the figures per seed go to benchmarks/results/<machine>/imbalance.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from vggkit.data import load_data
from vggkit.evaluate import evaluate
from vggkit.train import train

CLASSES = {"T-shirt/top": 400, "Pullover": 400, "Shirt": 20}  # Fashion-MNIST's names; Shirt 20x rarer
TEST_PER_CLASS = 300
# a small network and few epochs: nine runs on a CPU
FLAGS = {"arch": "1x16,1x32,1x64", "fc_width": 64, "epochs": 8, "eval_every_epoch_on_test": False}
RESULTS = Path(__file__).resolve().parent / "results"


def build(out: Path, seed: int = 0) -> Path:
    """Write OUT/folder/{train,test}/<class>/<index>.png (see the module docstring); returns OUT/folder."""
    rng = np.random.default_rng(seed)
    splits = load_data("fashion-mnist", val_size=0, allow_sample=False, log=lambda *a, **k: None)
    folder = out / "folder"
    for tree, dataset, counts in (("train", splits.train, CLASSES),
                                  ("test", splits.test, dict.fromkeys(CLASSES, TEST_PER_CLASS))):
        for name, count in counts.items():
            label = splits.classes.index(name)
            chosen = rng.choice(np.flatnonzero(dataset.labels == label), count, replace=False)
            target = folder / tree / name.replace("/", "-")
            target.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                Image.fromarray(dataset.images[index, :, :, 0], mode="L").save(target / f"{index:05d}.png")
    return folder


def run_one(folder: Path, out: Path, mode: str, seed: int) -> dict:
    name = f"{mode}-seed{seed}"
    history = train({"data": str(folder), "balance": mode, "seed": seed, "out": str(out / "runs"), "name": name,
                     **FLAGS},
                    overwrite=True, progress="none", log=lambda *a, **k: None)
    result = evaluate(history.run_dir, log=lambda *a, **k: None)
    rare = min(CLASSES, key=CLASSES.get).replace("/", "-")
    return {"mode": mode, "seed": seed, "balanced_acc": result["balanced_acc"], "acc": result["acc"],
            "macro_f1": result["macro_f1"], "rare_recall": result["per_class_metrics"][rare]["recall"],
            "ece": result["ece"], "test_images": result["count"]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def table(rows: list[dict], modes: list[str]) -> str:
    lines = ["| --balance | balanced accuracy (median) | per seed | accuracy | macro F1 | Shirt recall |",
             "|---|---|---|---|---|---|"]
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]

        def median(key):
            return statistics.median(r[key] for r in mine)

        seeds = ", ".join(f"{r['balanced_acc']:.4f}" for r in mine)
        lines.append(f"| {mode} | {median('balanced_acc'):.4f} | {seeds} | {median('acc'):.4f} | "
                     f"{median('macro_f1'):.4f} | {median('rare_recall'):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default="off,weights,sampling")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    folder = args.out / "folder" if (args.out / "folder" / "train").is_dir() else build(args.out)
    rows = []
    for seed in seeds:
        for mode in modes:
            rows.append(run_one(folder, args.out, mode, seed))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, modes))
    from records import machine_slug  # benchmarks/records.py: one folder of results per machine

    path = RESULTS / machine_slug(cpu_name()) / "imbalance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": f"benchmarks/bench_imbalance.py OUT --seeds {args.seeds} "
                                           f"--modes {args.modes}",
                                "cpu": cpu_name(), "classes": CLASSES, "flags": FLAGS, "test_per_class": TEST_PER_CLASS,
                                "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
