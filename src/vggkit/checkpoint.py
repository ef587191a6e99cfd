"""Files we can trust: atomic writes, weights as safetensors, training state without pickled code.

A checkpoint is a directory holding the weights (plus the model config and preprocessing as JSON
metadata) and, for training checkpoints, the training state (optimizer, schedule, RNG, epoch,
step; loads with torch.load(weights_only=True)); rundir.py names the files and knows where
checkpoints lie in a run. A directory is written beside its final name and swapped in with
renames, so a kill at any moment leaves a complete checkpoint (and at worst a stale temporary
directory, removed by the next save). Reading a checkpoint that a training swaps out meanwhile is
looked up again once (load_model). Weights that are not finite are never loaded as a model.

With weight averaging (--ema, ema.py) the averaged weights are in the same weights file, under
EMA_PREFIX + the network's keys, and their settings in the metadata ("ema"): one file, swapped in
with the rest. load_model returns them by default, the raw weights with averaged=False.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .atomic import atomic_write, atomic_write_text, check_folder, fsync_dir, honour_umask, make_folder  # noqa: F401
from .errors import VggkitError
from .model import VGG
from .rundir import SAFETENSORS_TEMPORARY, STATE, WEIGHTS, previous, weights_file
from .rundir import find_checkpoint as resolve_checkpoint  # noqa: F401  (the name callers know)

if TYPE_CHECKING:
    from .ema import EMA

EMA_PREFIX = "ema."  # the averaged weights' keys in a weights file: "ema." + the network's state-dict key


def save_checkpoint(directory: str | Path, model: VGG, meta: dict, state: dict | None = None,
                    averaged: EMA | None = None) -> None:
    """Write model weights (+ meta, + the `averaged` weights) and optional training state as one unit at `directory`."""
    directory = Path(directory)
    make_folder(directory.parent)
    for name in (directory, previous(directory)):  # renamed and removed below: never a link
        check_folder(name)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        honour_umask(tmp)
        save_weights(tmp / WEIGHTS, model, meta, averaged)
        if state is not None:
            torch.save(state, tmp / STATE)
            with open(tmp / STATE, "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        old = previous(directory)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_temporaries(directory.parent)


def remove_stale_temporaries(checkpoints: Path) -> None:
    """Remove the temporary checkpoint directories (.last.*.tmp, .best.*.tmp) that a kill during an
    earlier save left behind, with safetensors' own temporary (.tmpXXXXXX) when the kill fell while
    it wrote the weights. Only the run's one training process (it holds the run's lock) saves
    there, so none is in use; a folder holding anything but those files is left alone."""
    for stale in checkpoints.glob(".*.tmp"):
        if stale.is_dir() and not stale.is_symlink() and all(_checkpoint_file(p) for p in stale.iterdir()):
            shutil.rmtree(stale, ignore_errors=True)


def _checkpoint_file(path: Path) -> bool:
    """A regular file of the kind save_checkpoint writes into its temporary folder."""
    return stat.S_ISREG(os.lstat(path).st_mode) and (path.name in (WEIGHTS, STATE)
                                                      or fnmatchcase(path.name, SAFETENSORS_TEMPORARY))


def all_finite(tensors) -> bool:
    """Whether every floating-point value is finite: one fused reduction (the max-norm of each
    tensor: NaN or inf where any element is), one device sync."""
    tensors = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.stack([n.float() for n in norms]).isfinite().all())


def save_weights(path: str | Path, model: VGG, meta: dict, averaged: EMA | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if averaged is not None:
        tensors |= {EMA_PREFIX + k: v.to("cpu").contiguous() for k, v in averaged.state_dict().items()}
        meta = meta | {"ema": averaged.settings()}
    header = {"vggkit": json.dumps({"model": model.config(), **meta})}
    save_file(tensors, str(path), metadata=header)
    honour_umask(path)  # safetensors creates the file 0600


REQUIRED_META = ("model",)  # what rebuilds the network; the rest has defaults (export.preprocessing)


def read_meta(path: str | Path) -> dict:
    """The JSON metadata stored with the weights (model config, classes, preprocessing, ...)."""
    weights = weights_file(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise VggkitError(f"{weights} is not a readable safetensors file ({e}); point to a vggkit checkpoint") from None
    if "vggkit" not in header:
        raise VggkitError(f"{weights} has no vggkit metadata; it was not written by vggkit (see vggkit.convert)")
    try:
        meta = json.loads(header["vggkit"])
    except ValueError as e:
        raise VggkitError(f"{weights} has damaged vggkit metadata (not JSON: {e}); use another checkpoint") from None
    missing = [key for key in REQUIRED_META if key not in meta] if isinstance(meta, dict) else ["all"]
    if missing or not isinstance(meta["model"], dict):
        raise VggkitError(f"{weights} has incomplete vggkit metadata (missing {', '.join(missing) or 'model'}); "
                          "use another checkpoint")
    return meta


def split_averaged(state: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """A weights file's tensors as (the raw weights, the averaged ones or None), each under the network's keys."""
    raw = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    averaged = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    return raw, averaged or None


def load_model(path: str | Path, device: str | torch.device = "cpu", averaged: bool = True) -> tuple[VGG, dict]:
    """Rebuild the network stored at `path` (run dir, checkpoint dir or weights file); returns (model, meta).

    With weight averaging, the averaged weights unless `averaged` is False; meta["weights"] says
    which were loaded: "ema" or "raw". A checkpoint that a training replaces while it is read (its
    next save swaps the folder) is looked up again, once."""
    folder = resolve_checkpoint(path)
    before = folder_identity(folder)
    try:
        return _load_model(path, device, averaged)
    except (VggkitError, OSError):
        if folder_identity(folder) == before:  # not swapped: the checkpoint itself is bad
            raise
    return _load_model(path, device, averaged)  # the checkpoint that replaced it


def folder_identity(path: Path) -> tuple[int, int] | None:
    """Which folder is at `path` now (device, inode); None when there is none: a save swapping a
    checkpoint folder changes it."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _load_model(path: str | Path, device: str | torch.device, averaged: bool) -> tuple[VGG, dict]:
    weights = weights_file(path)
    meta = read_meta(weights)
    try:
        model = VGG.from_config(meta["model"])
    except VggkitError as e:
        raise VggkitError(f"{weights}: {e}") from None
    try:
        raw, ema = split_averaged(load_file(str(weights)))
        state = ema if averaged and ema is not None else raw
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0]
        raise VggkitError(f"cannot load weights from {weights}: {first}") from None
    if not all_finite(state.values()):
        bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        raise VggkitError(f"{weights} holds NaN or infinite weights ({len(bad)} tensors, first {bad[0]}): "
                          "it comes from a diverged training; train again with a lower --lr")
    meta["weights"] = "ema" if state is ema else "raw"
    return model.to(device).eval(), meta
