"""Numbers for people to read."""
from __future__ import annotations

SI_PREFIXES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))


def si(value: float, unit: str = "", digits: int = 1, space: bool = True) -> str:
    """`value` with an SI prefix: si(3.14e12, "FLOP/s") = "3.1 TFLOP/s", si(512_160_000, digits=2,
    space=False) = "512.16M". Below 1000 no prefix, and a whole number is written as one ("0")."""
    gap = " " if space else ""
    for prefix, scale in SI_PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f}{gap}{prefix}{unit}"
    number = str(int(value)) if float(value).is_integer() else f"{value:.{digits}f}"
    return f"{number}{gap if unit else ''}{unit}"


def binary_size(n: float) -> str:
    """A number of bytes in GiB, MiB or KiB: binary_size(3 * 2**30) = "3.0 GiB"; below 1 KiB "N B"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
