"""Medians of the A/B runs in this folder: python summary.py (after run_ab.sh)."""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
medians = {}
for code in ("plain", "fifth", "sixth"):
    runs = [json.loads(p.read_text()) for p in sorted(HERE.glob(f"{code}_*.json"))]
    train = [v for r in runs for v in r["train_images_per_s_runs"]]
    infer = [v for r in runs for v in r["infer_images_per_s_runs"]]
    others = max(r["other_processes_cpu"] for r in runs)
    medians[code] = (statistics.median(train), statistics.median(infer))
    print(f"| fast | {code} | {statistics.median(train):,.1f} ({min(train):,.1f}-{max(train):,.1f}) "
          f"| {statistics.median(infer):,.1f} ({min(infer):,.1f}-{max(infer):,.1f}) | {len(train)} runs, others <= {others:.2f} CPUs |")
for code in ("fifth", "sixth"):
    print(f"{code}: training {medians[code][0] / medians['plain'][0]:.2f}x plain, "
          f"inference {medians[code][1] / medians['plain'][1]:.2f}x plain")
print(f"sixth against fifth: training {medians['sixth'][0] / medians['fifth'][0]:.2f}x, "
      f"inference {medians['sixth'][1] / medians['fifth'][1]:.2f}x")

# d2l, run_ab_d2l.sh: this step's inference against the commit before it
d2l = {}
for code in ("before", "after"):
    runs = [json.loads(p.read_text()) for p in sorted(HERE.glob(f"d2l_{code}_*.json"))]
    if not runs:
        continue
    train = [v for r in runs for v in r["train_images_per_s_runs"]]
    infer = [v for r in runs for v in r["infer_images_per_s_runs"]]
    d2l[code] = statistics.median(infer)
    print(f"| d2l | {code} | {statistics.median(train):,.1f} ({min(train):,.1f}-{max(train):,.1f}) "
          f"| {statistics.median(infer):,.1f} ({min(infer):,.1f}-{max(infer):,.1f}) | {len(train)} runs |")
if len(d2l) == 2:
    print(f"d2l inference: {d2l['after'] / d2l['before']:.2f}x")
