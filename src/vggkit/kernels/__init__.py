"""Fast CPU kernels for the training step, built from C++ at first use (build.py) with PyTorch's
ops as the fallback.

- pool_relu.py: `max_pool_relu(x)`, relu(max_pool2d(x, 2, 2)) fused, forward and backward
- build.py: building, caching and loading the library; the one-line note when it cannot be had
- max_pool_relu.cpp: the kernels (NCHW and channels-last; float32, bfloat16, float64)
"""
from . import build
from .build import KernelLibrary
from .pool_relu import MaxPoolReLU, fusable, max_pool_relu


def available() -> bool:
    """Whether the C++ kernels are loaded (building them at the first call if need be)."""
    return build.LIBRARY.available()


__all__ = ["KernelLibrary", "MaxPoolReLU", "available", "fusable", "max_pool_relu"]
