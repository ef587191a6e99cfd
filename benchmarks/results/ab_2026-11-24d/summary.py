"""Medians of the A/B runs in this folder: python summary.py (after run_ab.sh)."""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
for preset in ("fast", "d2l"):
    medians = {}
    for code in ("plain", "fast"):
        runs = [json.loads(p.read_text()) for p in sorted(HERE.glob(f"{code}_{preset}_*.json"))]
        train = [v for r in runs for v in r["train_images_per_s_runs"]]
        infer = [v for r in runs for v in r["infer_images_per_s_runs"]]
        others = max(r["other_processes_cpu"] for r in runs)
        medians[code] = statistics.median(train), statistics.median(infer)
        print(f"| {preset} | --kernels {code} | {statistics.median(train):,.1f} ({min(train):,.1f}-{max(train):,.1f}) "
              f"| {statistics.median(infer):,.1f} | {len(train)} runs, others <= {others:.2f} CPUs |")
    print(f"{preset}: training {medians['fast'][0] / medians['plain'][0]:.2f}x, "
          f"inference {medians['fast'][1] / medians['plain'][1]:.2f}x")
