"""Medians of the A/B runs in this folder: python summary.py (after run_ab.sh)."""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
for preset, codes in (("fast", ("plain", "onednn_wgrad", "amx_wgrad")), ("d2l", ("plain", "onednn_wgrad", "amx_wgrad"))):
    medians = {}
    for code in codes:
        runs = [json.loads(p.read_text()) for p in sorted(HERE.glob(f"{code}_{preset}_*.json"))]
        train = [v for r in runs for v in r["train_images_per_s_runs"]]
        infer = [v for r in runs for v in r["infer_images_per_s_runs"]]
        others = max(r["other_processes_cpu"] for r in runs)
        medians[code] = statistics.median(train)
        print(f"| {preset} | {code} | {statistics.median(train):,.1f} ({min(train):,.1f}-{max(train):,.1f}) "
              f"| {statistics.median(infer):,.1f} | {len(train)} runs, others <= {others:.2f} CPUs |")
    print(f"{preset}: AMX weight gradients {medians['amx_wgrad'] / medians['onednn_wgrad']:.3f}x oneDNN's"
          + (f"; fast kernels {medians['amx_wgrad'] / medians['plain']:.2f}x plain" if "plain" in medians else ""))
