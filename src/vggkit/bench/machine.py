"""The machine a measurement runs on: its name, a clock that waits for the device, and how busy
other processes keep it (a shared machine makes timings low; the benchmarks say so)."""
from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import torch

from ..runtime import synchronize

RUN_SECONDS = 4.0  # auto steps: aim for runs of about this long


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "CPU"
    return device.type


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds that n calls of fn() take, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall time), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(values[:8]) - idle) / ticks, own.user + own.system, time.perf_counter()


def others_cpu(before) -> float | None:
    """CPU cores other processes kept busy on average since `before` (machine busy time - ours)."""
    after = cpu_snapshot()
    if before is None or after is None:
        return None
    wall = after[2] - before[2]
    return round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / max(wall, 1e-9), 2)


def auto_steps(seconds_per_step: float, run_seconds: float = RUN_SECONDS) -> int:
    """Steps for a timed run of about run_seconds, between 2 and 100."""
    return max(2, min(100, math.ceil(run_seconds / max(seconds_per_step, 1e-6))))
