"""Block architectures: a preset name, a string "1x64,1x128,..." or a sequence ((1, 64), ...).

Every form is turned into one representation, a tuple of (num_convs, out_channels) pairs.
PRESETS here are architectures; training recipes (fast, d2l, best) are config.RECIPES.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import VggkitError

Arch = tuple[tuple[int, int], ...]

# Simonyan & Zisserman 2014, Table 1: configurations A, B, D and E.
PRESETS: dict[str, Arch] = {
    "vgg11": ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    "vgg13": ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    "vgg19": ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
}
# The textbook's VGG-11 (same blocks; it is meant for 1-channel 224x224 Fashion-MNIST).
PRESETS["d2l-vgg11"] = PRESETS["vgg11"]
# Defaults that go with a preset name when the caller gives none.
PRESET_IN_CHANNELS = {"d2l-vgg11": 1}

# Far beyond any VGG (at most 4 convolutions of 512 channels a block), short of what the machine
# cannot hold: an absurd number is a typo, said before torch tries to allocate it.
MAX_CHANNELS = 65_536
MAX_CONVS_PER_BLOCK = 64

_BLOCK = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*$")


def parse_arch(arch: str | Sequence[Sequence[int]], ratio: int = 1) -> Arch:
    """Return the architecture as ((num_convs, channels), ...), every width divided by `ratio`."""
    blocks = _blocks_from(arch)
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
        raise VggkitError(f"ratio must be a positive integer, got {ratio!r}; use e.g. --ratio 4")
    scaled = []
    for i, (num_convs, channels) in enumerate(blocks, start=1):
        if num_convs < 1 or channels < 1:
            raise VggkitError(
                f"block {i} is {num_convs}x{channels}: convolutions and channels must be positive; "
                "write blocks as NUMxCHANNELS, e.g. 2x64"
            )
        if num_convs > MAX_CONVS_PER_BLOCK or channels > MAX_CHANNELS:
            raise VggkitError(
                f"block {i} is {num_convs}x{channels}: a block may have at most {MAX_CONVS_PER_BLOCK} convolutions "
                f"of at most {MAX_CHANNELS:,} channels (VGG has up to 4 of 512); e.g. 2x512"
            )
        if channels // ratio == 0:
            raise VggkitError(
                f"ratio {ratio} empties block {i} ({channels} channels // {ratio} = 0); "
                f"use a ratio of at most {channels}"
            )
        scaled.append((num_convs, channels // ratio))
    return tuple(scaled)


def _blocks_from(arch) -> list[tuple[int, int]]:
    if isinstance(arch, str):
        key = arch.strip().lower()
        if key in PRESETS:
            return list(PRESETS[key])
        return _parse_string(arch)
    try:
        blocks = [tuple(block) for block in arch]
    except TypeError:
        raise VggkitError(f"architecture must be a preset name, a string or a sequence, got {arch!r}") from None
    if not blocks:
        raise VggkitError("the architecture has no blocks; give at least one, e.g. ((1, 64),)")
    for block in blocks:
        if len(block) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in block):
            raise VggkitError(f"block {block!r} is not a (num_convs, channels) pair of integers; e.g. (2, 64)")
    return blocks


def _parse_string(text: str) -> list[tuple[int, int]]:
    if not text.strip():
        raise VggkitError(
            f"the architecture is empty; use a preset ({', '.join(PRESETS)}) or blocks like 1x64,1x128"
        )
    blocks = []
    for part in text.split(","):
        match = _BLOCK.match(part)
        if not match:
            raise VggkitError(
                f"cannot read block {part.strip()!r} in architecture {text!r}; write NUMxCHANNELS "
                f"blocks separated by commas (e.g. 1x64,1x128,2x256) or a preset ({', '.join(PRESETS)})"
            )
        blocks.append((int(match[1]), int(match[2])))
    return blocks


def format_arch(arch: Arch) -> str:
    """The string form, e.g. "1x64,1x128"."""
    return ",".join(f"{n}x{c}" for n, c in arch)
