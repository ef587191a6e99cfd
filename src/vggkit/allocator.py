"""Keep freed CPU memory for the next training step instead of handing it back to the kernel.

Why (measured, BENCHMARKS.md "What each speed choice buys"): PyTorch's CPU tensors come from
malloc. glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
unmaps it on free, so every training step faults each large activation back in, 4 KiB at a
time, and the kernel zeroes every page. For VGG-11/4 at 224x224, batch 128 (the d2l preset),
that is hundreds of thousands of page faults per step, a large share of the step time
(BENCHMARKS.md). With `retain_freed_memory()` the blocks come from the heap and are reused
from step to step: the same step runs measurably faster (bf16, channels-last), at the price of
a higher peak RSS (freed blocks stay resident and the heap fragments; see
"Memory estimate vs measured").

Linux with glibc only; elsewhere the functions do nothing and return False. The setting is
process-wide and can be undone with `default_freed_memory()` (or use the `allocator` context).
"""
from __future__ import annotations

import ctypes
import platform
import sys
from contextlib import contextmanager

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_INT_MAX = 2**31 - 1

_libc = None
_mode = "default"


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc or None


def available() -> bool:
    """Whether this process's allocator can be tuned (Linux, glibc)."""
    return _glibc() is not None


def resolve(which: str, device) -> str:
    """'auto' means retain on a CPU whose allocator can be tuned; otherwise the mode asked for
    ('retain' falls back to 'default' where it can't be had: other platforms, CUDA tensors)."""
    if which not in ("auto", "retain", "default"):
        raise ValueError(f"allocator must be auto, retain or default, got {which!r}")
    if getattr(device, "type", device) != "cpu" or not available():
        return "default"
    return "retain" if which == "auto" else which


def mode() -> str:
    """'retain' after retain_freed_memory(), else 'default'."""
    return _mode


def retain_freed_memory() -> bool:
    """Serve every block from the heap (no mmap) and never trim it: freed memory is reused."""
    global _mode
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    if ok:
        _mode = "retain"
    return ok


def default_freed_memory() -> bool:
    """Back to glibc's behaviour in a long-running process, and return the retained memory.

    glibc's default thresholds are dynamic (they grow to the largest freed mmapped block, at
    most 32 MiB; trimming at twice that); setting any of them fixes them, so this sets the
    values a training loop reaches by itself: mmap above 32 MiB, trim above 64 MiB.
    """
    global _mode
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(M_MMAP_MAX, 65536)
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
    libc.malloc_trim(0)
    _mode = "default"
    return True


def set_mode(which: str) -> None:
    """Switch to 'retain' or 'default' (nothing to do when already there)."""
    if which not in ("retain", "default"):
        raise ValueError(f"allocator must be retain or default, got {which!r}")
    if which != _mode:
        (retain_freed_memory if which == "retain" else default_freed_memory)()


@contextmanager
def allocator(which: str):
    """`with allocator("retain"):` or `allocator("default")`; restores the previous mode on exit."""
    previous = _mode
    set_mode(which)
    try:
        yield
    finally:
        set_mode(previous)
