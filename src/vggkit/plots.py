"""matplotlib without a display, and a figure written as a PNG whole or not at all (atomic.py)."""
from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_png(fig, path: str | Path, **savefig) -> Path:
    """Save `fig` as the PNG `path` atomically, then close it; returns the path."""
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", **savefig))
    pyplot().close(fig)
    return Path(path)
