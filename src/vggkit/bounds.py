"""Sizes that come from outside (flags, TOML files, checkpoint metadata, dataset headers) are
checked here before anything of that size is allocated, read or decompressed (issue 27).

- memory_limit(device): what the machine can hold: on the CPU the least of its physical memory,
  the container's limit (cgroup) and this process's limits (ulimit -v, -d); on a GPU its memory.
  Every refusal names the limit it met.
- training_memory / inference_memory: cost.py's estimate of what a network (as VGG.config()
  describes it) needs, computed on the meta device: nothing is allocated to compute it. The
  estimate counts only the tensors a step keeps (cost.py), so a network it refuses cannot fit;
  one it lets through may still need more (the allocator's cache, the runtime).
- check_arch_input: the smallest input an architecture takes (every block halves the side)
  must fit, before anything decides or builds the input size from it.
- read_capped: a file's first bytes up to a cap (a TOML file; `--config /dev/zero` ends).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import VggkitError
from .units import binary_size

MAX_CONFIG_BYTES = 1 << 20  # a vggkit TOML file is a few dozen lines; 1 MiB is far beyond any
FLOAT32 = 4
IN_PLACE = ("ReLU", "Dropout", "Flatten", "Identity")  # no new tensor in an inference pass


@dataclass(frozen=True)
class Limit:
    bytes: int
    what: str  # e.g. "this machine's 23.4 GiB of memory"


def memory_limit(device=None) -> Limit:
    """The most memory a run on `device` (a torch.device, a name or None for the CPU) can have."""
    kind = getattr(device, "type", str(device or "cpu").split(":")[0])
    if kind == "cuda":
        import torch

        index = getattr(device, "index", None)
        properties = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
        return Limit(properties.total_memory,
                     f"the GPU's {binary_size(properties.total_memory)} ({properties.name})")
    limits = [_physical_memory(), _cgroup_limit(), *_rlimits()]
    found = [limit for limit in limits if limit is not None]
    if not found:
        return Limit(1 << 62, "no known limit")
    return min(found, key=lambda limit: limit.bytes)


def _physical_memory() -> Limit | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return Limit(total, f"this machine's {binary_size(total)} of memory") if total > 0 else None


def _cgroup_limit() -> Limit | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read(64).strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's huge number: no limit
            return Limit(int(text), f"the container's {binary_size(int(text))} memory limit (cgroup)")
    return None


def _rlimits() -> list[Limit]:
    try:
        import resource
    except ImportError:  # Windows
        return []
    found = []
    for name, flag in (("RLIMIT_AS", "-v"), ("RLIMIT_DATA", "-d")):
        if not hasattr(resource, name):
            continue
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY and soft > 0:
            found.append(Limit(soft, f"this process's {binary_size(soft)} memory limit (ulimit {flag})"))
    return found


def check_fits(need: int, what: str, fix: str, device=None) -> None:
    """A VggkitError when `need` bytes exceed what the device can hold: "{what} needs ~N, more than {limit}; {fix}"."""
    limit = memory_limit(device)
    if need > limit.bytes:
        raise VggkitError(f"{what} needs ~{_amount(need)}, more than {limit.what}; {fix}")


def _amount(n: int) -> str:
    return binary_size(n) if n < 1 << 60 else f"2^{n.bit_length() - 1} bytes"


def check_arch_input(blocks: int, input_size, channels: int = 1, device=None) -> None:
    """Refuse an architecture whose smallest input (2**blocks a side: each block halves it), or an
    input size, whose one image in float32 cannot fit: the data is never loaded for it."""
    smallest = 2 ** blocks
    side = max(_longest(input_size), smallest) if input_size is not None else smallest
    limit = memory_limit(device)
    need = FLOAT32 * channels * side * side
    if need <= limit.bytes:
        return
    if input_size is None or _longest(input_size) < smallest:
        most = max(0, int(math.log(max(limit.bytes // (FLOAT32 * channels), 1), 4)))
        exact = f" = {smallest:,}" if blocks <= 40 else ""
        raise VggkitError(f"the architecture has {blocks:,} blocks, so its input is at least 2^{blocks}{exact} "
                          f"pixels a side (every block halves it): one image of that size needs ~{_amount(need)}, "
                          f"more than {limit.what}; use at most {most} blocks")
    most = math.isqrt(limit.bytes // (FLOAT32 * channels))
    raise VggkitError(f"input size {_size_text(input_size)}: one image of it needs ~{_amount(need)}, more than "
                      f"{limit.what}; use an input size below {most:,}")


def _longest(size) -> int:
    return max(size) if isinstance(size, (tuple, list)) else int(size)


def _size_text(size) -> str:
    return "x".join(map(str, size)) if isinstance(size, (tuple, list)) else str(size)


def meta_network(config: dict):
    """The VGG `config` describes (VGG.config()'s keys), on the meta device: shapes, no memory."""
    import torch

    from .model import VGG

    with torch.device("meta"):
        return VGG(**config)


def training_memory(config: dict, batch_size: int, optimizer: str, dtype: str) -> int:
    """cost.py's estimate of one training step's memory, in bytes (optimizer: a cost.OPTIMIZER_STATES name)."""
    from .cost import summary

    return summary(meta_network(config), batch_size=batch_size, optimizer=optimizer, dtype=dtype).memory()["total"]


def inference_memory(config: dict, batch_size: int) -> int:
    """One float32 forward pass without gradients, in bytes: the weights, and at the widest layer its
    input and output for every image of the batch (what the pass must hold at once). Layers that make
    no new tensor in inference (in-place ReLU, dropout, flatten) are left out."""
    from .cost import summary

    report = summary(meta_network(config), batch_size=1, dtype="float32")
    sizes = [FLOAT32 * _numel(report.input_shape),
             *(row.output_bytes for row in report.layers if row.kind not in IN_PLACE)]
    widest = max(a + b for a, b in zip(sizes, sizes[1:]))
    return FLOAT32 * report.params + batch_size * widest


def check_inference_fits(config: dict, batch_size: int, device=None, fix: str = "use a smaller --batch-size") -> None:
    size = "x".join(map(str, config["input_size"]))
    what = f"inference on {batch_size} image{'s' if batch_size != 1 else ''} of {size}"
    check_fits(inference_memory(config, batch_size), what, fix, device)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def check_training_fits(config, network: dict, device=None, amp_dtype=None, world_size: int = 1,
                        decisions: dict | None = None, extra: int = 0) -> None:
    """Refuse a training step that cannot fit the device: cost.py's estimate of the step of `network`
    (VGG keyword arguments) at this process's share of config.batch_size, with config's optimizer, under
    autocast to amp_dtype (None: float32), plus `extra` bytes; `decisions` (decide.py's notes) say
    where the batch size and input size came from."""
    import torch

    from .specs import parse_arch

    optimizer = "momentum" if config.optimizer == "sgd" and config.momentum > 0 else config.optimizer
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(amp_dtype, "float32")
    batch = -(-config.batch_size // world_size)
    need = training_memory(network, batch, optimizer, dtype) + extra
    size = network["input_size"]
    side = "x".join(map(str, size)) if isinstance(size, (list, tuple)) else f"{size}x{size}"
    arch = network["arch"] if len(str(network["arch"])) <= 40 else f"{len(parse_arch(network['arch']))} blocks"
    why = {key: (decisions or {}).get(key) for key in ("input_size", "batch_size")}
    what = (f"a training step of {arch} (fc width {network['fc_width']}) at batch {batch}"
            + (f" ({why['batch_size']})" if why["batch_size"] else "")
            + f", input {side}" + (f" ({why['input_size']})" if why["input_size"] else ""))
    check_fits(need, what, "use a smaller --batch-size or --input-size, fewer or narrower blocks, or a smaller "
               "--fc-width", device)


def read_capped(path, cap: int = MAX_CONFIG_BYTES, what: str = "file") -> bytes:
    """The bytes of the file at path, refused (VggkitError) beyond `cap`: at most cap + 1 are read."""
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise VggkitError(f"{what} {path} is larger than {binary_size(cap)}, more than any vggkit config holds "
                          "(a few key = value lines); give the right file")
    return data
