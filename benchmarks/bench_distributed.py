"""Training throughput with 1 and 2 processes on this machine (torchrun + DDP, gloo), and the cost
of the collectives a distributed step adds.

    .venv/bin/python benchmarks/bench_distributed.py [--data-dir DIR] [--runs 3] [--limit 12800]

Each configuration runs `vggkit train` (the fast preset on a slice of Fashion-MNIST, 2 epochs) --runs
times in fresh processes; the figure is the median over runs of epoch 2's training images/s (global:
all ranks' images; evaluation excluded), as printed in the run's metrics.csv.
Configurations: 1 process x 2 threads, 1 x 1, 2 processes x 1 thread (`--nproc 2 --threads 1`), 2 x 2.
Then, in 2 gloo processes on the loopback interface: the median time of an all-reduce of 1 int64 (the
per-step stop check) and of one float32 tensor the size of the model (DDP's gradient all-reduce).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("VGGKIT_TEST_DATA", ROOT.parent / "shared" / "data" / "fashion-mnist"))
CONFIGS = [("1 process x 2 threads", 1, 2), ("1 process x 1 thread", 1, 1),
           ("2 processes x 1 thread", 2, 1), ("2 processes x 2 threads", 2, 2)]


def cpu_name() -> str:
    import torch

    from vggkit.bench.machine import device_name
    return device_name(torch.device("cpu"))


def train_command(nproc: int, threads: int, args, out: str, name: str) -> list[str]:
    cmd = [sys.executable, "-m", "vggkit", "train", "--preset", "fast", "--epochs", "2", "--limit", str(args.limit),
           "--val-size", "1000", "--test-limit", "1000", "--threads", str(threads), "--data-dir", str(args.data_dir),
           "--no-allow-sample", "--out", out, "--name", name, "--quiet"]
    return cmd + (["--nproc", str(nproc)] if nproc > 1 else [])


def run_config(nproc: int, threads: int, args, out: str) -> list[float]:
    rates = []
    for run in range(args.runs):
        name = f"p{nproc}t{threads}r{run}"
        cmd = train_command(nproc, threads, args, out, name)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        with open(Path(out) / name / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        rates.append(float(rows[-1]["images_per_s"]))
    return rates


COLLECTIVE = textwrap.dedent("""
    import os, statistics, sys, time, torch
    import torch.distributed as dist
    from vggkit import distributed as vd
    rank, store, numel = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", VGGKIT_DIST_INIT="file://" + store)
    torch.set_num_threads(1)
    vd.init_from_env()
    out = []
    for tensor in (torch.zeros(1, dtype=torch.int64), torch.zeros(numel)):
        for _ in range(20):
            dist.all_reduce(tensor)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(50):
                dist.all_reduce(tensor)
            times.append((time.perf_counter() - start) / 50)
        out.append(statistics.median(times))
    if rank == 0:
        print(*out, flush=True)
    os._exit(0)
""")


def collective_times(numel: int) -> tuple[float, float]:
    from vggkit.distributed import loopback_interface

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "collective.py"
        script.write_text(COLLECTIVE)
        env = {**os.environ, "GLOO_SOCKET_IFNAME": loopback_interface() or "", "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, str(script), str(r), f"{tmp}/store", str(numel)], env=env,
                                  stdout=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    small, large = (float(v) for v in outs[0].split())
    return small, large


def model_size() -> int:
    import torch
    from vggkit.config import resolve_config
    from vggkit.decide import LIKE_FASHION_MNIST, decide

    with torch.device("meta"):
        model = decide(resolve_config("fast"), LIKE_FASHION_MNIST)[0].build_model(in_channels=1, num_classes=10)
    return sum(t.numel() for t in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=12800, help="training images (2 epochs of them)")
    parser.add_argument("--only", choices=["train", "collectives"], default=None)
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the 1-minute load average to fall below 0.3")
    args = parser.parse_args()
    import torch

    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 0.3 and time.monotonic() < deadline:
        time.sleep(5)

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}; python {platform.python_version()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if args.only != "collectives":
        print(f"\nfast preset, {args.limit} training images, epoch 2 images/s, median of {args.runs} runs")
        print("| configuration | images/s (median) | runs |\n| --- | --- | --- |")
        with tempfile.TemporaryDirectory() as out:
            for label, nproc, threads in CONFIGS:
                start = time.perf_counter()
                rates = run_config(nproc, threads, args, out)
                print(f"| {label} | {statistics.median(rates):,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} |"
                      f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.only != "train":
        numel = model_size()
        small, large = collective_times(numel)
        print(f"\ngloo all-reduce, 2 processes on 127.0.0.1: 1 int64 {small * 1e6:.0f} us; "
              f"{numel:,} float32 (the fast model's gradients) {large * 1e3:.2f} ms")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
