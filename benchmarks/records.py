"""Accuracy records (issue 16): a recipe run cold, several seeds; the ablation table; the
accuracy-against-wall-time plot.

    # one configuration, N seeds, each a fresh `vggkit train` process timed from launch to exit
    .venv/bin/python benchmarks/records.py run LABEL --seeds 0,1,2 [--tta] -- --preset fast --epochs 10
    # a seed run by hand (its run directory, its wall time) added to LABEL's record
    .venv/bin/python benchmarks/records.py add LABEL RUN_DIR --seed 0 --wall 1884.2 --how "/usr/bin/time -v vggkit train ..."
    # a markdown table of every stored configuration (the ablation table of BENCHMARKS.md)
    .venv/bin/python benchmarks/records.py table [LABEL ...]
    # test accuracy against wall time, one line per label (the median-accuracy seed)
    .venv/bin/python benchmarks/records.py plot fast best --reference d2l=benchmarks/results/amd-epyc/d2l_10_epochs

Results land in benchmarks/results/MACHINE/records.json, one record per LABEL (the command, the CPU,
each seed's wall time, test accuracy of the last epoch and of the best checkpoint (chosen on
validation, never on test), and the per-epoch curve). A recipe trained with --tta reports its
closing TTA figure (inside the wall time); else --tta here scores the best checkpoint with
`vggkit evaluate RUN --tta` afterwards, its time reported apart. Run it alone: it times 2 busy cores.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA_DIR = ROOT.parent / "shared" / "data" / "fashion-mnist"


def cpu_name() -> str:
    import torch

    from vggkit.bench.machine import device_name

    return device_name(torch.device("cpu"))


def vggkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "vggkit", *args]


def one_run(out: Path, seed: int, flags: list[str], data_dir: str, tta: bool) -> dict:
    name = f"seed{seed}"
    command = vggkit("train", "--data-dir", data_dir, "--out", str(out), "--name", name, "--overwrite", "--quiet",
                     "--seed", str(seed), *flags)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return run_record(out / name, seed, time.perf_counter() - start, tta)


def run_record(run: Path, seed: int, wall: float, tta: bool = False) -> dict:
    """One seed's entry, from its finished run directory and its wall time from launch to exit."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    startup = wall - float(rows[-1]["elapsed"])  # imports, data loading, final writes: counted up front
    result = {"seed": seed, "wall_s": round(wall, 2), "epochs": len(rows),
              "test_acc_last": float(rows[-1]["test_acc"]), "test_acc_best": best_row_test_acc(rows),
              "curve": [(round(startup + float(r["elapsed"]), 2), float(r["test_acc"])) for r in rows]}
    end = trained_with_tta(run)
    if end:  # train --tta: the closing figure, inside the wall time
        result["test_acc_tta"] = end["tta_test_acc"]
        result["tta"] = end["tta"]
    elif tta:
        result.update(tta_score(run))
    return result


def trained_with_tta(run: Path) -> dict | None:
    """The best checkpoint's TTA figures of a run trained with --tta (its end event), else None."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "end" and "best_checkpoint" in event:
            return event["best_checkpoint"]
    return None


def best_row_test_acc(rows: list[dict]) -> float:
    """The test accuracy of the epoch vggkit keeps as checkpoints/best: best validation accuracy
    (the last of equals), or the last epoch when there is no validation split."""
    scored = [r for r in rows if r.get("val_acc")]
    if not scored:
        return float(rows[-1]["test_acc"])
    best = max(reversed(scored), key=lambda r: float(r["val_acc"]))
    return float(best["test_acc"])


def tta_score(run: Path) -> dict:
    start = time.perf_counter()
    out = subprocess.run(vggkit("evaluate", str(run), "--tta"), check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - start
    match = re.search(r"top-1[^0-9]*([0-9.]+)%", out) or re.search(r"accuracy[^0-9]*([0-9.]+)%", out)
    return {"test_acc_tta": float(match.group(1)) / 100 if match else None, "tta_s": round(seconds, 2),
            "tta_output": out.strip().splitlines()[:6]}


def run(args, flags: list[str]) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    record = {"label": args.label, "flags": flags, "cpu": cpu_name(), "cores": os.cpu_count(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": f"benchmarks/records.py run {args.label} --seeds {args.seeds}"
                         + (" --tta" if args.tta else "") + " -- " + " ".join(flags), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            r = one_run(Path(tmp), seed, flags, args.data_dir, args.tta)
            record["runs"].append(r)
            tta = f", with TTA {r['test_acc_tta']:.4f}" if r.get("test_acc_tta") else ""
            print(f"{args.label} seed {seed}: test {r['test_acc_best']:.4f} (best ckpt), {r['test_acc_last']:.4f} "
                  f"(last){tta}, wall {r['wall_s']:.1f} s", flush=True)
    save(record)


def machine_slug(cpu: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon': the folder of a machine's results."""
    words = re.sub(r"\((R|TM)\)", "", cpu, flags=re.I).lower().replace("processor", "").replace("cpu", "")
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-") or "unknown"


def all_records() -> dict[str, dict]:
    records = {}
    for path in sorted(RESULTS.glob("*/records.json")):
        records.update(json.loads(path.read_text()))
    return records


def save(record: dict) -> None:
    path = RESULTS / machine_slug(record["cpu"]) / "records.json"
    records = json.loads(path.read_text()) if path.exists() else {}
    records[record["label"]] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(summary_line(record))
    print(f"wrote {path.relative_to(ROOT)}")


def add(args) -> None:
    """A seed run by hand (e.g. under /usr/bin/time) into LABEL's record: its run directory and wall time.
    The record must exist (made by `run`, so its flags and command are the ones measured)."""
    record = all_records()[args.label]
    entry = run_record(Path(args.run_dir), args.seed, args.wall)
    entry["source"] = f"{args.run_dir} (added by hand: {args.how})"
    record["runs"] = sorted([r for r in record["runs"] if r["seed"] != args.seed] + [entry], key=lambda r: r["seed"])
    save(record)


def stats(record: dict, key: str) -> tuple[float, float, float] | None:
    values = [r[key] for r in record["runs"] if r.get(key) is not None]
    if not values:
        return None
    return statistics.mean(values), statistics.median(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_line(record: dict) -> str:
    acc, wall = stats(record, "test_acc_best"), stats(record, "wall_s")
    line = (f"{record['label']}: test {100 * acc[0]:.2f}% mean, {100 * acc[1]:.2f}% median (sd {100 * acc[2]:.2f}) "
            f"over {len(record['runs'])} seeds, wall {wall[1]:.1f} s median")
    tta = stats(record, "test_acc_tta")
    return line + (f"; with TTA {100 * tta[0]:.2f}% mean" if tta else "")


def load(labels: list[str]) -> list[dict]:
    records = all_records()
    return [records[label] for label in labels] if labels else list(records.values())


def table(args) -> None:
    print("| configuration | flags | seeds | test accuracy, mean (per seed) | with TTA, mean | wall time, median (min-max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for record in load(args.labels):
        accs = [r["test_acc_best"] for r in record["runs"]]
        walls = [r["wall_s"] for r in record["runs"]]
        tta = stats(record, "test_acc_tta")
        per_seed = ", ".join(f"{100 * a:.2f}" for a in accs)
        print(f"| {record['label']} | `{' '.join(record['flags'])}` | {len(accs)} | "
              f"{100 * statistics.mean(accs):.2f}% ({per_seed}) | {f'{100 * tta[0]:.2f}%' if tta else '-'} | "
              f"{statistics.median(walls):.1f} s ({min(walls):.1f}-{max(walls):.1f}) |")


def reference_curve(folder: Path) -> list[tuple[float, float]]:
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    return [(float(r["elapsed"]), float(r["test_acc"])) for r in rows]


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for record in load(args.labels):
        runs = sorted(record["runs"], key=lambda r: r["test_acc_best"])
        middle = runs[len(runs) // 2]
        if not middle.get("curve"):  # lost (see the record's note): the nearest seed that has one
            middle = min((r for r in runs if r.get("curve")), key=lambda r: abs(r["test_acc_best"] - middle["test_acc_best"]))
        ax.plot(*zip(*middle["curve"]), marker="o", markersize=3,
                label=f"{record['label']} (seed {middle['seed']}, of {len(runs)} seeds)")
    for spec in args.reference or []:
        label, folder = spec.split("=", 1)
        ax.plot(*zip(*reference_curve(Path(folder))), marker="s", markersize=3, linestyle="--", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"wall time since launch (s, log scale), {os.cpu_count()} CPU cores")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_ylim(args.ymin, None)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("label")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tta", action="store_true", help="also score the best checkpoint with `vggkit evaluate --tta`")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p = sub.add_parser("add")
    p.add_argument("label")
    p.add_argument("run_dir")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--wall", type=float, required=True, help="seconds from launch to exit, measured outside")
    p.add_argument("--how", required=True, help="the command that ran it, for the record")
    p = sub.add_parser("table")
    p.add_argument("labels", nargs="*")
    p = sub.add_parser("plot")
    p.add_argument("labels", nargs="*")
    p.add_argument("--reference", action="append", help="LABEL=RUN_DIR: a run's metrics.csv as a dashed line")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "accuracy_vs_time.png"))
    p.add_argument("--ymin", type=float, default=0.85)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args, flags)
    elif args.command == "add":
        add(args)
    elif args.command == "table":
        table(args)
    else:
        plot(args)


if __name__ == "__main__":
    main()
