"""`vggkit bench --profile`: where a training step's time goes.

A few of vggkit's real training steps (vggkit_steps.VggkitSteps: the batch loader, autocast, the
recipe's loss and optimizer) run under torch.profiler (CPU activity). Each profiled op's self time
goes to one group of GROUPS, and the table gives milliseconds per step and shares of the total.

Grouping: an op inside the batch loader (the `vggkit.data` range around it) or inside torch.optim
(its `Optimizer.step#...` / `Optimizer.zero_grad#...` ranges) belongs to data or optimizer;
otherwise the op's own name, else its nearest enclosing op's, picks the group by the first
pattern it contains (so a fill_ inside the max-pool backward counts as pooling); the rest is other.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, record_function

from ..runtime import ProcessSettings, pick_device, speed_settings
from .measure import DEFAULT_WARMUP, BenchSettings, bench_dataset, cost_report
from .vggkit_steps import VggkitSteps

PROFILE_STEPS = 5
DATA_RANGE = "vggkit.data"
# (group, patterns in lower case); ranges first: they claim every op inside them
RANGE_GROUPS = (("data", (DATA_RANGE,)), ("optimizer", ("optimizer.step#", "optimizer.zero_grad#")))
OP_GROUPS = (
    ("pooling", ("max_pool", "maxpool")),  # before activations: the fused kernel is max_pool_relu
    # the fused ops count where most of their work is: the first layer's conv, a block's batch norm
    ("convolution", ("convolution", "conv2d", "conv_pool", "conv3x3")),
    ("normalization", ("batch_norm", "batchnorm")),
    ("activations", ("relu", "threshold")),
)
GROUPS = ("convolution", "pooling", "activations", "normalization", "optimizer", "data", "other")


def profile(settings: BenchSettings | None = None, *, log=None, **changes) -> dict:
    """Profile `steps` training steps (default PROFILE_STEPS) after `warmup`; returns a dict with
    "groups" (milliseconds of self time per step, by group), "total_ms_per_step" and the setting."""
    settings = replace(settings or BenchSettings(), **changes)
    settings.check()
    config = settings.train_config()
    device = pick_device(config.device)
    log = log or (lambda *a, **k: None)
    with ProcessSettings() as process:
        allocator = process.apply(config, device)
        speed = speed_settings(config, device)
        dataset, data_note = bench_dataset(settings, config)
        arch, _ = cost_report(config, dataset.channels)
        steps = VggkitSteps(config, speed, device, dataset, settings.seed, settings.relu_inplace)
        warmup, count = settings.warmup or DEFAULT_WARMUP, settings.steps or PROFILE_STEPS
        log(f"profile: {warmup} warm-up steps, then {count} profiled")
        steps.mode(training=True)
        for _ in range(warmup):
            steps.train_step()
        events, wall = _profiled(steps, count)
    groups = group_times(events)
    per_step = {name: seconds * 1e3 / count for name, seconds in groups.items()}
    return {"arch": arch, "batch_size": config.batch_size, "device": str(device), "settings": speed.describe(),
            "kernels": steps.kernels, "allocator": allocator, "data": data_note, "steps": count, "warmup": warmup,
            "groups": per_step, "total_ms_per_step": sum(per_step.values()), "wall_ms_per_step": wall * 1e3 / count}


def _profiled(steps: VggkitSteps, count: int):
    """The profiler's events of `count` training steps, and their wall time in seconds."""
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(count):
            with record_function(DATA_RANGE):
                x, y = steps.next_batch()
            steps.step_on(x, y)
        wall = time.perf_counter() - start
    return prof.events(), wall


def group_times(events) -> dict[str, float]:
    """Seconds of self time per group (GROUPS, in that order) of profiler events."""
    totals = dict.fromkeys(GROUPS, 0.0)
    for event in events:
        totals[group_of(event)] += event.self_cpu_time_total / 1e6
    return totals


def group_of(event) -> str:
    chain = []
    while event is not None:
        chain.append(event.name.lower())
        event = event.cpu_parent
    for group, patterns in RANGE_GROUPS:
        if any(p in name for name in chain for p in patterns):
            return group
    for name in chain:  # the op itself first, then the ops that called it
        for group, patterns in OP_GROUPS:
            if any(p in name for p in patterns):
                return group
    return "other"


def format_profile(r: dict) -> str:
    total = r["total_ms_per_step"] or 1e-12
    lines = [f"vggkit bench --profile: {r['arch']}, batch {r['batch_size']}, {r['device']}, "
             f"{r['settings'] or 'fp32'}, kernels {r['kernels']}; {r['steps']} steps after {r['warmup']} warm-up",
             "", f"{'':<16}{'ms/step':>10}{'%':>8}"]
    for name in GROUPS:
        ms = r["groups"][name]
        lines.append(f"{name:<16}{ms:>10.1f}{100 * ms / total:>8.1f}")
    lines.append(f"{'total':<16}{r['total_ms_per_step']:>10.1f}{100.0:>8.1f}")
    lines += ["", f"self time of the profiled ops per step; the steps took {r['wall_ms_per_step']:.1f} ms each "
              f"(profiler on); data: {r['data']}"]
    return "\n".join(lines)
