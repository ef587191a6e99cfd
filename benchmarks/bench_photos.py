"""Photos at their real size: peak memory and wall time of `vggkit train --data FOLDER`, cold and from
the prepared cache, and the time to the first training step (BENCHMARKS.md, "Photos").

    .venv/bin/python benchmarks/bench_photos.py rss FOLDER [--runs 3] [-- TRAIN FLAGS]
    .venv/bin/python benchmarks/bench_photos.py first-step FOLDER [--runs 3] [-- TRAIN FLAGS]

rss: each run is a fresh `/usr/bin/time -v vggkit train --data FOLDER --epochs 1 ...` process; "cold"
runs start with an empty cache folder (XDG_CACHE_HOME pointed at a new temporary folder, with the
kernel library copied in, so that only the prepared cache is missing), "cached" runs find it.
Printed: peak RSS (the largest process: ru_maxrss) and wall time of each run, and their medians.
first-step: seconds from launch to the first training step's end (a --steps-file written by an on_step
hook), with the cache in place. Build folders with benchmarks/make_photos.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VGGKIT = [sys.executable, "-m", "vggkit"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def fresh_cache_home() -> str:
    """A new XDG_CACHE_HOME holding this machine's built kernel library, but no prepared cache."""
    home = tempfile.mkdtemp(prefix="vggkit-bench-")
    kernels = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vggkit" / "kernels"
    if kernels.is_dir():
        shutil.copytree(kernels, Path(home) / "vggkit" / "kernels")
    return home


def timed_train(folder: str, flags: list[str], home: str, out: str) -> dict:
    command = ["/usr/bin/time", "-v", *VGGKIT, "train", "--data", folder, "--epochs", "1", "--out", out,
               "--name", "bench", "--overwrite", "--quiet", *flags]
    env = dict(os.environ, XDG_CACHE_HOME=home)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"vggkit train failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_bytes": rss, "wall_seconds": round(seconds, 2)}


def rss(args) -> dict:
    out = tempfile.mkdtemp(prefix="vggkit-bench-runs-")
    cold = []
    for _ in range(args.cold_runs if args.cold_runs is not None else args.runs):
        home = fresh_cache_home()
        cold.append(timed_train(args.folder, args.flags, home, out))
        print("cold", cold[-1], flush=True)
    cached = []
    for _ in range(args.runs):  # the last cold run's cache is in place
        cached.append(timed_train(args.folder, args.flags, home, out))
        print("cached", cached[-1], flush=True)
    return {"cold": cold, "cached": cached,
            "median": {kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                       for kind, runs in (("cold", cold), ("cached", cached))}}


FIRST_STEP = """
import json, sys, time
from vggkit.train import train
started = float(sys.argv[1])
def on_step(step):
    if step == 1:
        print(f"FIRST_STEP {time.time() - started:.3f}", flush=True)
        raise SystemExit(0)
def value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text
config = {"data": sys.argv[2], "epochs": 1, "out": sys.argv[3], "name": "first",
          **{k: value(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}}
train(config, overwrite=True, progress="none", log=lambda *a, **k: None, on_step=on_step)
"""


def first_step(args) -> dict:
    out = tempfile.mkdtemp(prefix="vggkit-bench-runs-")
    subprocess.run([*VGGKIT, "prepare", args.folder], check=True, capture_output=True, cwd=ROOT)  # cache in place
    seconds = []
    for _ in range(args.runs):
        done = subprocess.run([sys.executable, "-c", FIRST_STEP, repr(time.time()), args.folder, out, *args.flags],
                              capture_output=True, text=True, cwd=ROOT)
        found = re.search(r"FIRST_STEP ([\d.]+)", done.stdout)
        if not found:
            raise SystemExit(f"no first step: {done.stderr.strip()[-2000:]}")
        seconds.append(float(found.group(1)))
        print("first step after", seconds[-1], "s", flush=True)
    return {"seconds": seconds, "median": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["rss", "first-step"])
    parser.add_argument("folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=None, help="rss: cold runs (default: --runs)")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("flags", nargs="*", help="after --: more train flags (rss) or config key=value (first-step)")
    args = parser.parse_args()
    result = {"cpu": cpu_name(), "folder": args.folder, "flags": args.flags,
              **(rss(args) if args.what == "rss" else first_step(args))}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
