"""Training speed (issue 5): vggkit vs the textbook loop, and what each speed choice buys.

    .venv/bin/python benchmarks/bench_speed.py [--part headline|fastpaths|all] [--rounds 3]
        [--presets d2l,fast] [--data-dir DIR] [--json results.json]

headline:  `vggkit bench --compare` on real Fashion-MNIST images for each preset: vggkit's
           training step and the textbook loop timed one after the other in each of --runs
           runs (same process, same cores), with the conv/matmul peak probes in between.
fastpaths: for each preset, one variant per speed choice (each one switched off or changed
           alone, from vggkit's automatic settings), every variant in a fresh process
           (the allocator and oneDNN state are process-wide), the variants run round-robin
           for --rounds rounds so that load from other processes spreads over all of them;
           the figure is the median over rounds, leaving out runs during which other processes
           kept more than 0.15 cores busy (when quiet runs remain). torch.compile gets
           --compile-timeout seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from fresh import WorkerFailed, run_worker

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("VGGKIT_TEST_DATA", ROOT.parent / "shared" / "data" / "fashion-mnist"))

QUIET = 0.15  # cores used by other processes during a run, above which the run is not counted

# name: (bench keyword arguments, extra environment, what it tests)
VARIANTS = {
    "vggkit auto": ({}, {}, "bf16 autocast, channels-last, retained allocator, eager, default threads, in-place ReLU"),
    "channels-last off (NCHW)": ({"channels_last": "off"}, {}, "channels-last vs NCHW"),
    "fp32 (no autocast)": ({"precision": "fp32"}, {}, "bf16 autocast vs fp32"),
    "fp32 + channels-last off": ({"precision": "fp32", "channels_last": "off"}, {}, "channels-last vs NCHW in fp32"),
    "allocator default": ({"allocator": "default"}, {}, "glibc malloc as a fresh process has it"),
    "allocator default + THP": ({"allocator": "default"}, {"THP_MEM_ALLOC_ENABLE": "1"},
                                "PyTorch's 2 MiB-page allocations (env var at start-up) instead of retaining"),
    "threads 1": ({"threads": 1}, {}, "torch.get_num_threads() default vs 1"),
    "out-of-place ReLU": ({"relu_inplace": False}, {}, "in-place vs out-of-place ReLU"),
    "torch.compile": ({"compile": "on"}, {}, "torch.compile (inductor) vs eager"),
    "all off (fp32 NCHW default allocator)": ({"precision": "fp32", "channels_last": "off", "allocator": "default"}, {},
                                               "the plain path with vggkit's batch pipeline"),
}


def others_busy(seconds: float = 2.0) -> float:
    """CPU cores kept busy by other processes over the next `seconds` (this one sleeps)."""
    from vggkit.bench.machine import cpu_snapshot, others_cpu

    before = cpu_snapshot()
    time.sleep(seconds)
    return others_cpu(before) or 0.0


def wait_quiet(budget: float, threshold: float = 0.15, log=print) -> float:
    """Wait (at most `budget` seconds) until other processes use less than `threshold` cores."""
    deadline, busy = time.monotonic() + budget, others_busy()
    while busy > threshold and time.monotonic() < deadline:
        log(f"  (other processes use {busy:.2f} cores: waiting)", flush=True)
        time.sleep(8)
        busy = others_busy()
    return busy


def worker(spec: dict) -> dict:
    import torch

    from vggkit.bench import bench

    result = bench(**spec["kwargs"], runs=1, peak=False, inference=False)
    result["default_threads"] = torch.get_num_threads()
    return result


def run_variant(preset: str, name: str, data_dir: str | None, timeout: int, steps: int | None) -> dict:
    kwargs, env, _ = VARIANTS[name]
    spec = {"kwargs": {"preset": preset, "warmup": 2, **({"steps": steps} if steps else {}),
                       **({"data": "fashion-mnist", "data_dir": data_dir} if data_dir else {}), **kwargs}}
    start = time.perf_counter()
    try:
        r = run_worker(__file__, json.dumps(spec), timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"variant": name, "timed_out": True, "seconds": round(time.perf_counter() - start, 1)}
    except WorkerFailed as e:
        return {"variant": name, "failed": str(e)[-1500:]}
    r["variant"], r["seconds"] = name, round(time.perf_counter() - start, 1)
    return r


def fastpaths(presets, rounds: int, data_dir, compile_timeout: int, variants, quiet: float = 0, partial=None,
              log=print) -> dict:
    table = {}
    for preset in presets:
        runs = {name: [] for name in variants}
        for rnd in range(rounds):
            for name in variants:
                if any(r.get("timed_out") for r in runs[name]):
                    continue  # compile that ran past its time once: do not retry
                timeout = compile_timeout if name == "torch.compile" else 900
                if quiet:
                    wait_quiet(quiet, log=log)
                r = run_variant(preset, name, data_dir, timeout, None)
                runs[name].append(r)
                if partial:
                    with open(partial, "a") as f:
                        f.write(json.dumps({"preset": preset, "round": rnd + 1, **r}) + "\n")
                figure = (f"{r['train_images_per_s']:.1f} img/s (first step {r['first_step_seconds']:.1f} s, "
                          f"{r['steps']} steps, others' CPU {r['other_processes_cpu']})" if "train_images_per_s" in r
                          else "timed out" if r.get("timed_out") else "failed: " + r.get("failed", "")[-300:])
                log(f"[{preset} round {rnd + 1}/{rounds}] {name}: {figure}", flush=True)
        rows = {}
        for name, rs in runs.items():
            ok = [r for r in rs if "train_images_per_s" in r]
            # runs during which other processes kept more than 0.15 cores busy are left out where others remain
            quiet_ok = [r for r in ok if (r.get("other_processes_cpu") or 0) <= QUIET]
            ok = quiet_ok or ok
            rows[name] = {"what": VARIANTS[name][2], "runs": [round(r["train_images_per_s"], 1) for r in ok],
                          "median": statistics.median([r["train_images_per_s"] for r in ok]) if ok else None,
                          "first_step_seconds": [r["first_step_seconds"] for r in ok],
                          "settings": ok[0]["settings"] if ok else None, "threads": ok[0]["threads"] if ok else None,
                          "allocator": ok[0]["allocator"] if ok else None,
                          "others_cpu": [r["other_processes_cpu"] for r in ok],
                          "timed_out": any(r.get("timed_out") for r in rs),
                          "failed": [r["failed"] for r in rs if "failed" in r]}
        table[preset] = rows
        auto = rows["vggkit auto"]["median"]
        log(f"\n{preset}: median images/s over {rounds} rounds")
        for name, row in rows.items():
            rel = f"{row['median'] / auto:.2f}x of auto" if row["median"] and auto else ""
            log(f"  {name:<42}{row['median'] or float('nan'):>9.1f}  {rel}  runs {row['runs']}")
    return table


def headline(presets, runs: int, data_dir, quiet: float = 0, run_seconds: float = 8.0, log=print) -> dict:
    from vggkit.bench import bench
    from vggkit.bench import format_bench

    out = {}
    for preset in presets:
        if quiet:
            wait_quiet(quiet, log=log)
        r = bench(preset=preset, compare=True, runs=runs, data="fashion-mnist" if data_dir else None, data_dir=data_dir,
                  run_seconds=run_seconds, log=lambda *a: log(*a, flush=True))
        log(format_bench(r), flush=True)
        out[preset] = r
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["headline", "fastpaths", "all"], default="all")
    parser.add_argument("--presets", default="d2l,fast")
    parser.add_argument("--rounds", type=int, default=3, help="fastpaths: rounds of all variants")
    parser.add_argument("--runs", type=int, default=5, help="headline: runs of vggkit + textbook")
    parser.add_argument("--run-seconds", type=float, default=8.0, help="headline: aim for runs this long")
    parser.add_argument("--variants", default=";".join(VARIANTS), help="names separated by ';'")
    parser.add_argument("--data-dir", default=str(DEFAULT_DIR) if (DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file()
                        else None, help="Fashion-MNIST (default: random uint8 images when absent)")
    parser.add_argument("--compile-timeout", type=int, default=420)
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each measurement wait up to this long for other processes to go quiet")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    presets = args.presets.split(",")
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()}
    if args.part in ("headline", "all"):
        results["headline"] = headline(presets, args.runs, args.data_dir, args.wait_quiet, args.run_seconds)
    if args.part in ("fastpaths", "all"):
        results["fastpaths"] = fastpaths(presets, args.rounds, args.data_dir, args.compile_timeout,
                                         args.variants.split(";"), args.wait_quiet,
                                         args.json + "l" if args.json else None)
    results["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
