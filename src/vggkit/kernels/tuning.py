"""Every measured threshold of the kernels, in one place, with the CPU it was measured on.

A threshold here is a measurement, not a law: each says on which CPU it was found (`measured_on`)
and which CPU feature it depends on (`depends_on`, read from this machine by `cpu_features`). The
routing (routing.py) reads them; `vggkit summary --explain` says when one decided a path and whether
this CPU is the kind it was measured on. To check them on another CPU, time each routed op against
the plain path there: benchmarks/bench_kernels.py --routes.

The C++ constants that must stay in C++ (they size loops at compile time) are listed in CXX_TUNING
with the same notes; change them in their file.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

XEON_AMX = "a 2-core Intel Xeon VM with AVX-512 and AMX (the machine of BENCHMARKS.md)"


@dataclass(frozen=True)
class Threshold:
    value: int
    means: str  # what the value decides, one line
    measured_on: str  # the CPU it was found on
    depends_on: str | None = None  # the CPU feature (cpu_features' name) the measurement hinges on, if one


# A gray (1-channel) first block runs conv + (batch norm +) ReLU + pool as one kernel (conv_pool.py) at
# most this many input channels; on RGB oneDNN's convolution on the AMX units measured faster.
FASTER_IN_CHANNELS = Threshold(
    1, "input channels up to which a first block's conv + pool kernel beats oneDNN's convolution then the pool",
    XEON_AMX, depends_on="amx")
# The weight gradient of a bf16 3x3 conv runs on the AMX tiles (conv_weight_grad.py) from this many
# input channels on: with one block of 16 input channels laying out the operands cost more than it gained.
MIN_IN_CHANNELS = Threshold(
    32, "input channels from which a conv's weight gradient on the AMX tiles beats oneDNN's",
    XEON_AMX, depends_on="amx")

# A dense layer trains on a bfloat16 copy of its weight that the SGD step writes (weight_copies.py) from
# this many weights on: the copy saves a cast over the weight each step, which paid on the whole step of
# d2l (25.7M and 16.8M weights) and cost more than it saved on the fast preset's (295K at most);
# BENCHMARKS.md, "Routing".
MIN_COPY_WEIGHTS = Threshold(
    1_000_000, "weights from which a dense layer's bfloat16 copy beats autocast's cast of the weight each step",
    XEON_AMX)

PYTHON_TUNING = {"FASTER_IN_CHANNELS": FASTER_IN_CHANNELS, "MIN_IN_CHANNELS": MIN_IN_CHANNELS,
                 "MIN_COPY_WEIGHTS": MIN_COPY_WEIGHTS}

# Compile-time choices in the C++ files, documented here beside the Python ones.
CXX_TUNING = {
    "max_pool_relu.cpp kWideChannels": Threshold(
        64, "channels from which the pool's forward row loop uses 512-bit vectors", XEON_AMX, depends_on="avx512"),
    "conv_pool_relu.cpp prefer-vector-width=512": Threshold(
        512, "vector width of the whole file's loops (GCC's default on AVX-512 is 256)", XEON_AMX,
        depends_on="avx512"),
    "conv_weight_grad.cpp kChunk": Threshold(
        512, "pixels per pass of the AMX weight gradient (256 and 1024 measured slower)", XEON_AMX,
        depends_on="amx"),
}


@dataclass(frozen=True)
class CpuFeatures:
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    flags: frozenset[str]  # /proc/cpuinfo's flags (empty where there is none)

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags or self.capability.startswith("AVX512")

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    def has(self, feature: str | None) -> bool:
        return feature is None or bool(getattr(self, feature))


@functools.lru_cache(maxsize=None)
def cpu_features() -> CpuFeatures:
    """This CPU's vector capability (as PyTorch sees it) and instruction-set flags, read once."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "DEFAULT"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return CpuFeatures(capability, frozenset(flags))


def measured_here(threshold: Threshold) -> str:
    """'' where this CPU has the feature the threshold was measured with, else a note saying it was not
    measured on a CPU like this one (the value is kept: nothing measured says otherwise)."""
    if cpu_features().has(threshold.depends_on):
        return ""
    return f"measured on {threshold.measured_on}; this CPU has no {threshold.depends_on.upper()}, not measured here"
