"""Where and how the model runs: device choice, precision, autocast, channels-last, and the
process-wide speed settings (threads, denormals, the CPU allocator). Each choice was measured:
see BENCHMARKS.md. Used by training, evaluation, prediction, export and the benchmarks alike.
"""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import allocator as alloc
from .errors import VggkitError
from .kernels import routing

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VggkitError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VggkitError("--device cuda asked for, but no CUDA GPU is available; use --device auto or cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VggkitError("--device mps asked for, but MPS is not available; use --device auto or cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished the work queued on it (CPU work is done when queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class Speed:
    amp_dtype: torch.dtype | None  # autocast dtype, None = float32
    channels_last: bool
    compile: bool
    kernels: str = "reordered"  # how the blocks compute: kernels.routing.MODES, set on a model by model.set_kernels

    @property
    def precision(self) -> str:
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.amp_dtype)

    def describe(self) -> str:
        return f"{self.precision}{', channels-last' if self.channels_last else ''}{', compiled' if self.compile else ''}"


def auto_precision(device: torch.device) -> str:
    """What precision "auto" means on `device` (train, bench, summary alike)."""
    # bf16 autocast: faster on AVX-512-BF16 CPUs and on Ampere+ GPUs, same accuracy (BENCHMARKS.md)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def speed_settings(config, device: torch.device) -> Speed:
    """Precision, memory format, compilation and kernels for `config` (anything with precision,
    channels_last and compile fields and maybe kernels: a TrainConfig) on `device`."""
    precision = auto_precision(device) if config.precision == "auto" else config.precision
    if precision == "fp16" and device.type != "cuda":
        raise VggkitError("fp16 training needs a CUDA GPU; use --precision bf16 or fp32 on this device")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16() and config.precision == "bf16":
        print("warning: this CPU has no native bf16; bf16 will be slow", file=sys.stderr)
    amp = PRECISIONS[precision]
    # channels-last: faster for the fast preset on CPU, neutral for d2l (BENCHMARKS.md); cuDNN prefers NHWC too
    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and device.type in ("cpu", "cuda"))
    # torch.compile measured slower for this network on CPU; on CUDA only when asked
    use_compile = config.compile == "on"
    return Speed(amp, channels_last, use_compile, block_kernels(getattr(config, "kernels", "fast"), device))


KERNEL_CHOICES = ("fast", "plain", "auto")  # the `kernels` setting; "auto" is the old spelling of "fast"


def block_kernels(setting: str, device: torch.device) -> str:
    """The blocks' mode (kernels.routing.MODES) for the `kernels` setting: "plain" is the network as it
    was (every layer in order, PyTorch's ops); "fast" pools before the last ReLU, with the fused C++
    kernels on the CPU (the only device they exist for: elsewhere "reordered")."""
    if setting not in KERNEL_CHOICES:
        raise VggkitError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {setting!r}")
    return routing.mode_for(setting, device)


class ProcessSettings:
    """Process-wide speed settings for one training run, restored afterwards (a notebook keeps its own)."""

    def __enter__(self):
        self._threads, self._allocator = torch.get_num_threads(), alloc.mode()
        return self

    def apply(self, config, device: torch.device, log=None) -> str:
        if config.threads:
            torch.set_num_threads(usable_threads(config.threads, log))
        if device.type == "cpu":
            # denormal floats in early updates slow CPU steps many times over (BENCHMARKS.md); results unchanged
            torch.set_flush_denormal(True)
        # retained CPU memory: faster for large activations (no page faults on every step), more RSS
        mode = alloc.resolve(config.allocator, device)
        alloc.set_mode(mode)
        return mode

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)
        torch.set_flush_denormal(False)  # torch's default; it has no getter
        alloc.set_mode(self._allocator)




def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as taskset or a container's cpuset limit it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def usable_threads(asked: int, log=None) -> int:
    """`asked` threads, capped at the cores this process may use, with a note when capped: more threads
    than cores only take turns on them (OpenMP threads spin while they wait), many times slower."""
    cores = usable_cores()
    if asked <= cores:
        return asked
    (log or (lambda text: print(text, file=sys.stderr)))(
        f"note: --threads {asked} is more than the {cores} cores this process may use; using {cores}")
    return cores


def in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading
    return threading.current_thread() is threading.main_thread()


def autocast(device: torch.device, speed: Speed):
    if speed.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=speed.amp_dtype)
