"""The fast preset, cold start: `vggkit train --preset fast` in a fresh process, timed from launch
to exit (imports and data loading included), N runs; plots test accuracy against wall time.

    .venv/bin/python benchmarks/bench_fast.py [--runs 3] [--data-dir ../shared/data/fashion-mnist]
"""
import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(out: Path, name: str, data_dir: str, extra: list[str]) -> dict:
    vggkit = Path(sys.executable).with_name("vggkit")
    start = time.perf_counter()
    subprocess.run([str(vggkit), "train", "--preset", "fast", "--data-dir", data_dir, "--out", str(out),
                    "--name", name, "--quiet", *extra], check=True)
    wall = time.perf_counter() - start
    rows = list(csv.DictReader(open(out / name / "metrics.csv")))
    startup = wall - float(rows[-1]["elapsed"])  # imports, data loading, final writes: counted up front
    curve = [(startup + float(r["elapsed"]), float(r["test_acc"])) for r in rows]
    return {"wall": wall, "test_acc": float(rows[-1]["test_acc"]), "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist"))
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "fast_preset.png"))
    args, extra = parser.parse_known_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            r = one_run(Path(tmp), f"run{i}", args.data_dir, extra)
            print(f"run {i + 1}: test acc {r['test_acc']:.4f}, wall {r['wall']:.1f} s", flush=True)
            results.append(r)
    print(f"median: test acc {statistics.median(r['test_acc'] for r in results):.4f}, "
          f"wall {statistics.median(r['wall'] for r in results):.1f} s over {len(results)} runs")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for i, r in enumerate(results):
        ax.plot(*zip(*r["curve"]), marker="o", markersize=3, label=f"run {i + 1}")
    ax.axhline(0.925, color="gray", linestyle="--", linewidth=1, label="92.5%")
    ax.axvline(180, color="gray", linestyle=":", linewidth=1, label="3 minutes")
    ax.set_xlabel("wall time since launch (s), 2 CPU cores")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_ylim(0.8, 0.95)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
