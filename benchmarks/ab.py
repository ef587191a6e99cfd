"""A/B speed comparison: `vggkit bench` for two or more versions ("arms") of vggkit, alternating in
rounds so that the machine's drift hits every arm alike; all results go to one JSON file.

    # two commits: check the older one out beside this one (git worktree add ../before COMMIT)
    python benchmarks/ab.py run --arm before=../before --arm after=. --presets fast,d2l --rounds 2 \\
        --out benchmarks/results/MACHINE/speed_ab.json
    # one checkout, two settings: extra `vggkit bench` flags after the arm's source
    python benchmarks/ab.py run --arm "plain=. --kernels plain" --arm "fast=. --kernels fast" --compare
    # one checkout with a function switched off: Python run before vggkit starts (--setup NAME=CODE)
    python benchmarks/ab.py run --arm "plain=. --kernels plain" --arm off=. --arm on=. \\
        --setup "off=import vggkit.kernels.conv_weight_grad as c; c.MIN_IN_CHANNELS = 10**9" --presets fast --rounds 3
    # medians (min-max) per preset and arm, and each arm against the first and against the one before it
    python benchmarks/ab.py summary benchmarks/results/MACHINE/speed_ab.json

An arm is NAME=SOURCE [FLAGS]: SOURCE a checkout (its src/ is put first on PYTHONPATH) or a src
folder; FLAGS are added to `vggkit bench --preset P --runs N --no-peak --json`. With --compare, the
last arm also runs `vggkit bench --preset P --runs N --compare --json` once per preset (the peak
probes and the textbook loop). Every figure is the median over all timed runs of an arm (rounds x
runs). Run it alone on the machine: it times busy cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = "import sys; from vggkit.cli import main; sys.exit(main(sys.argv[1:]))"


def parse_arm(text: str) -> dict:
    head, *flags = shlex.split(text)
    name, sep, source = head.partition("=")
    if not sep or not name or not source:
        raise SystemExit(f"ab.py: error: --arm {text!r}: expected NAME=SOURCE [FLAGS]")
    src = Path(source).resolve()
    src = src / "src" if (src / "src" / "vggkit").is_dir() else src
    if not (src / "vggkit").is_dir():
        raise SystemExit(f"ab.py: error: --arm {name}: no vggkit package in {src}; give a checkout or its src folder")
    return {"name": name, "src": str(src), "flags": flags, "setup": ""}


def bench(arm: dict, args: list[str], python: str) -> dict:
    """One `vggkit bench ... --json` in a fresh process running the arm's code; its JSON report."""
    code = f"{arm['setup']}\n{BENCH}" if arm["setup"] else BENCH
    env = {**os.environ, "PYTHONPATH": arm["src"]}
    done = subprocess.run([python, "-c", code, "bench", *args, "--json"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ab.py: error: arm {arm['name']}: vggkit bench {' '.join(args)} exited "
                         f"{done.returncode}:\n{done.stderr.strip()}")
    report = json.loads(done.stdout)
    if done.stderr.strip():
        report["stderr"] = done.stderr.strip()
    return report


def run(args) -> None:
    arms = [parse_arm(text) for text in args.arm]
    names = [arm["name"] for arm in arms]
    if len(arms) < 2 or len(set(names)) != len(names):
        raise SystemExit("ab.py: error: give at least two --arm, each with its own NAME")
    for text in args.setup or []:
        name, _, code = text.partition("=")
        if name not in names:
            raise SystemExit(f"ab.py: error: --setup {name}: no such arm ({', '.join(names)})")
        arms[names.index(name)]["setup"] = code
    presets = args.presets.split(",")
    result = {"command": "python benchmarks/ab.py " + shlex.join(sys.argv[1:]),
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "arms": arms, "runs": {p: {n: [] for n in names} for p in presets}, "compare": {}}
    for round_ in range(1, args.rounds + 1):
        for preset in presets:
            for arm in arms:
                report = bench(arm, ["--preset", preset, "--runs", str(args.runs), "--no-peak", *arm["flags"]],
                               args.python)
                report["round"] = round_
                result["runs"][preset][arm["name"]].append(report)
                print(f"round {round_}, {preset}, {arm['name']}: training "
                      f"{report['train_images_per_s']:,.1f} images/s", flush=True)
    if args.compare:
        for preset in presets:
            last = arms[-1]
            result["compare"][preset] = [bench(last, ["--preset", preset, "--runs", str(args.runs), "--compare",
                                                      *last["flags"]], args.python)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    print_summary(result)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def print_summary(result: dict) -> None:
    print("| preset | arm | training images/s, median (min-max) | inference images/s, median (min-max) | runs |")
    print("| --- | --- | --- | --- | --- |")
    ratios = []
    for preset, arms in result["runs"].items():
        medians = {}
        for name, reports in arms.items():
            if not reports:
                continue
            train = [v for r in reports for v in r["train_images_per_s_runs"]]
            infer = [v for r in reports for v in r["infer_images_per_s_runs"]]
            others = max(r.get("other_processes_cpu", 0.0) for r in reports)
            medians[name] = statistics.median(train), statistics.median(infer)
            print(f"| {preset} | {name} | {spread(train)} | {spread(infer)} "
                  f"| {len(train)}, others <= {others:.2f} CPUs |")
        names = list(medians)
        for before, after in zip(names, names[1:]):
            pairs = [(names[0], after)] + ([(before, after)] if before != names[0] else [])
            for a, b in pairs:
                ratios.append(f"{preset}: {b} against {a}: training {medians[b][0] / medians[a][0]:.2f}x, "
                              f"inference {medians[b][1] / medians[a][1]:.2f}x")
    for preset, reports in result.get("compare", {}).items():
        for r in reports:
            peak = r.get("train_fraction_of_peak")
            ratios.append(f"{preset}, --compare: {r['train_images_per_s']:,.1f} images/s"
                          + (f", {100 * peak:.1f}% of the peak" if peak else "")
                          + (f", {r['speedup']:.1f}x the textbook loop" if r.get("speedup") else ""))
    print("\n".join(ratios))


def summary(args) -> None:
    print_summary(json.loads(Path(args.file).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the A/B and write its JSON file")
    p.add_argument("--arm", action="append", required=True, help="NAME=SOURCE [FLAGS] (at least two)")
    p.add_argument("--setup", action="append", help="NAME=PYTHON: code the arm runs before vggkit starts")
    p.add_argument("--presets", default="fast,d2l", help="comma-separated (default fast,d2l)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of alternation (default 2)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per `vggkit bench` (default 3)")
    p.add_argument("--compare", action="store_true", help="then the last arm with --compare, once per preset")
    p.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ab.json"), help="the JSON file to write")
    s = sub.add_parser("summary", help="medians and ratios of a written file")
    s.add_argument("file")
    args = parser.parse_args()
    {"run": run, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
