"""Collectives of a distributed run: who this process is (`world`), joining the process group,
sums over ranks, and the two agreements every rank must reach together (the run directory, when to stop)."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import VggkitError

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait for the other ranks


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def timeout_seconds() -> float:
    """The collective timeout: $VGGKIT_DIST_TIMEOUT seconds, default 60."""
    text = os.environ.get("VGGKIT_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise VggkitError(f"VGGKIT_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


def init_from_env(device: torch.device | str | None = None) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched by it
    (a plain `python` or notebook process: WORLD_SIZE unset or 1) or when already joined.

    Backend: $VGGKIT_DIST_BACKEND if set, else gloo (CPU), or gloo for CPU tensors plus NCCL for
    CUDA tensors where CUDA is available. Rendezvous: torchrun's store (env://), or the file store
    in $VGGKIT_DIST_INIT (file://PATH) that `launch` uses so nothing listens on a network port.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = os.environ.get("VGGKIT_DIST_BACKEND")
    if not backend:
        kind = torch.device(device).type if device is not None else None
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        backend = "cpu:gloo,cuda:nccl" if cuda and kind in (None, "cuda") else "gloo"
    if "nccl" in backend and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % max(torch.cuda.device_count(), 1))
    kwargs = {}
    if os.environ.get("VGGKIT_DIST_INIT"):
        kwargs = dict(init_method=os.environ["VGGKIT_DIST_INIT"], rank=int(os.environ["RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()), **kwargs)
    return True


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: `cuda` without an index becomes cuda:LOCAL_RANK in a distributed run."""
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class MainRankError(VggkitError):
    """Rank 0's error, raised on the other ranks too (rank 0 prints it; they exit quietly)."""


def from_main(fn):
    """fn() run on rank 0 only, its result given to every rank (broadcast); an error raised there
    is raised on every rank (on the others as a MainRankError with the same message)."""
    rank, world_size = world()
    if world_size == 1:
        return fn()
    box = [None]
    error = None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001  tell the others, then raise it here
            error = e
            box[0] = ("error", str(e) if isinstance(e, VggkitError) else f"on rank 0: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))  # gloo, also beside NCCL
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise MainRankError(value)
    return value


def agree_run_dir(prepare) -> Path:
    """The run directory, chosen once by rank 0 (`prepare()`: a default name holds the time) and given
    to every rank. Under `launch`, rank 0 also tells the launcher where it is ($VGGKIT_RUN_DIR_FILE)."""
    run_dir = from_main(prepare)
    if world()[0] == 0 and os.environ.get("VGGKIT_RUN_DIR_FILE"):
        try:
            with open(os.environ["VGGKIT_RUN_DIR_FILE"], "w") as f:
                f.write(str(run_dir))
        except OSError:
            pass
    return run_dir

def agree_stop(stop) -> int | None:
    """The stop signal any rank has received (stop.signal, set on every rank), or None.

    Every rank must call this at the same points of the loop: it is one tiny all-reduce, so that
    all ranks leave the loop after the same step even though a signal reaches them at different times.
    """
    if world()[1] == 1:
        return stop.signal
    flag = torch.tensor([stop.signal or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = int(flag.item())
    if not agreed:
        return None  # even if a signal arrived here meanwhile: the next call sees it, on every rank
    if stop.signal is None:
        stop.signal = agreed
    return agreed
