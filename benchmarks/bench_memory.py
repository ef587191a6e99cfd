"""Training memory: cost.summary(...).memory()["total"] against the measured peak on the CPU.

    .venv/bin/python benchmarks/bench_memory.py [--steps 3] [--configs d2l-128,...] [--json out.json]

Each configuration runs in a fresh process (VmHWM, the peak RSS, cannot be reset): import,
random uint8 images in a BatchLoader, then baseline = VmRSS; then the model, the optimizer and
`--steps` real training steps (train.py's speed settings, BatchLoader, make_optimizer, train_step);
measured = VmHWM - baseline. Before the model, one step of a throwaway 1-conv network with
the same settings loads the runtime (OpenMP threads, oneDNN): its RSS growth is reported as
"runtime" and "warm" = measured - runtime is the model's own need. Estimate: summary(model, batch_size, optimizer, dtype) with the
optimizer of the preset and dtype bfloat16 under bf16 autocast, float32 otherwise.
The glibc allocator is measured both ways: "default" (a fresh process's malloc) and "retain"
(allocator.retain_freed_memory(), what `vggkit train` and `vggkit bench` use on CPU by default); and "exact": every
block of 64 KiB or more gets its own mmap and is unmapped when freed, so the RSS follows the live
tensors (slow, but it shows what the step itself needs, without allocator caching).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fresh import WorkerFailed, run_worker


# name: (preset, overrides)
CONFIGS = {
    "d2l-128": ("d2l", {}),
    "d2l-128-fp32": ("d2l", {"precision": "fp32"}),
    "d2l-64": ("d2l", {"batch_size": 64}),
    "d2l-32": ("d2l", {"batch_size": 32}),
    "vgg16/8-32": ("d2l", {"arch": "vgg16", "ratio": 8, "batch_size": 32}),
    "vgg11/8-64-nchw-fp32": ("d2l", {"ratio": 8, "batch_size": 64, "precision": "fp32", "channels_last": "off"}),
    "fast-256": ("fast", {}),
    "best-128": ("best", {}),
}


def rss() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))


def worker(name: str, allocator_mode: str, steps: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from vggkit import allocator
    from vggkit.config import resolve_config
    from vggkit.decide import LIKE_FASHION_MNIST, decide
    from vggkit.cost import summary
    from vggkit.data import Dataset
    from vggkit.model import VGG
    from vggkit.pipeline import BatchLoader
    from vggkit.distributed import batch_loss
    from vggkit.runtime import autocast, pick_device, speed_settings
    from vggkit.steps import train_step
    from vggkit.optim import make_optimizer

    preset, overrides = CONFIGS[name]
    config = decide(resolve_config(overrides={"preset": preset, **overrides}), LIKE_FASHION_MNIST)[0]
    device = pick_device("cpu")
    speed = speed_settings(config, device)
    if allocator_mode == "retain":
        allocator.retain_freed_memory()
    elif allocator_mode == "exact":  # every block >= 64 KiB its own mmap: RSS follows the live tensors
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(allocator.M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(allocator.M_TRIM_THRESHOLD, 64 * 1024)
    rng = np.random.default_rng(0)
    n = config.batch_size * 2
    data = Dataset(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n), list("0123456789"))
    loader = BatchLoader(data, config.batch_size, device=device, input_size=config.input_size, shuffle=True,
                         drop_last=True, channels_last=speed.channels_last)
    kwargs = dict(ratio=config.ratio, in_channels=1, num_classes=10, input_size=config.input_size,
                  fc_width=config.fc_width, dropout=config.dropout, batch_norm=config.batch_norm, init=config.init)
    with torch.device("meta"):
        meta = VGG(config.arch, **kwargs)
    optimizer_kind = "momentum" if config.optimizer == "sgd" and config.momentum > 0 else config.optimizer
    dtype = "bfloat16" if speed.amp_dtype == torch.bfloat16 else "float32"
    estimate = summary(meta, batch_size=config.batch_size, optimizer=optimizer_kind, dtype=dtype).memory()

    base, _ = rss()
    # the runtime's one-time memory (OpenMP threads, oneDNN): one step of a throwaway 1-conv network
    # with the same settings; measured separately so it can be told apart from the model's need
    tiny = VGG("1x8", in_channels=1, input_size=28, fc_width=8, batch_norm=config.batch_norm)
    if speed.channels_last:
        tiny = tiny.to(memory_format=torch.channels_last)
    with autocast(device, speed):
        F.cross_entropy(tiny(torch.rand(2, 1, 28, 28)), torch.zeros(2, dtype=torch.long)).backward()
    del tiny
    warm_base, _ = rss()
    model = VGG(config.arch, **kwargs)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    sums = torch.zeros(3, dtype=torch.float64)
    after_model, _ = rss()
    peaks = []
    for i in range(steps):
        loader.set_epoch(i)
        x, y = next(iter(loader))
        train_step(model, optimizer, None, speed, x, y, sums,
                   lambda logits, y: batch_loss(logits, y, len(y), config.label_smoothing))
        del x, y
        peaks.append(rss()[1] - base)
    return {"config": name, "preset": preset, "overrides": overrides, "allocator": allocator_mode,
            "settings": speed.describe(), "batch_size": config.batch_size, "arch": config.arch, "ratio": config.ratio,
            "input_size": config.input_size, "optimizer": optimizer_kind, "dtype": dtype,
            "estimate": estimate, "measured": peaks[-1], "measured_per_step": peaks,
            "model_and_optimizer_rss": after_model - warm_base, "runtime_init": warm_base - base,
            "measured_warm": peaks[-1] - (warm_base - base),
            "error": estimate["total"] / peaks[-1] - 1,
            "error_warm": estimate["total"] / (peaks[-1] - (warm_base - base)) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--allocators", default="exact,default,retain")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    results = []
    print(f"{'config':<24}{'allocator':<10}{'settings':<24}{'estimate':>10}{'measured':>10}{'error':>8}"
          f"{'runtime':>10}{'warm':>10}{'error':>8}")
    for name in args.configs.split(","):
        for mode in args.allocators.split(","):
            try:
                r = run_worker(__file__, name, mode, "--steps", str(args.steps))
            except WorkerFailed as e:
                print(f"{name} {mode}: failed\n{e}")
                continue
            results.append(r)
            print(f"{name:<24}{mode:<10}{r['settings']:<24}{r['estimate']['total'] / 2**20:>8.0f}Mi"
                  f"{r['measured'] / 2**20:>8.0f}Mi{100 * r['error']:>+7.0f}%{r['runtime_init'] / 2**20:>8.0f}Mi"
                  f"{r['measured_warm'] / 2**20:>8.0f}Mi{100 * r['error_warm']:>+7.0f}%", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
