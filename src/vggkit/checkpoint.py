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
import math
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
    except RecursionError:
        raise VggkitError(f"{weights} has damaged vggkit metadata (JSON nested too deeply to read); "
                          "use another checkpoint") from None
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
    which were loaded: "ema" or "raw". The checkpoint is checked first (check_checkpoint): nothing
    larger than what its file holds is built. meta has classes, mean, std and input_size (defaults
    where the file has none: as export.preprocessing fills them). A checkpoint that a training replaces
    while it is read (its next save swaps the folder) is looked up again, once."""
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
    check_checkpoint(weights, meta, device)
    model = VGG.from_config(meta["model"])
    meta = with_defaults(meta, model)
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


# ---------------------------------------------------------------------------------------------
# One validation of a checkpoint, used by every loader (evaluate, predict, export, --init through
# load_model; --resume through check_weights and check_training_state): the metadata's values by
# type and range, the network it describes against the tensors the file holds (names, shapes and
# dtypes from the safetensors header: nothing is loaded), and one image's inference against what the
# machine can hold. A file that passes builds nothing larger than itself.

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the floating-point dtypes
COUNTER_DTYPES = ("I64", "I32")  # batch norm's num_batches_tracked, a step counter
COUNTER = "num_batches_tracked"


def file_tensors(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} of every tensor in the file, from its header only."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise VggkitError(f"{weights} is not a readable safetensors file ({e}); point to a vggkit checkpoint") from None


def check_checkpoint(weights: Path, meta: dict, device: str | torch.device = "cpu") -> None:
    """Refuse (VggkitError, one line naming the file) a checkpoint whose metadata is damaged, whose
    network is not the one its tensors make, whose weights are not floating point, or whose one-image
    inference cannot fit the machine. meta: read_meta's."""
    from .bounds import check_inference_fits

    tensors = file_tensors(weights)
    try:
        network = _described_network(meta["model"], tensors)
        check_meta_values(meta, network)
    except VggkitError as e:
        raise VggkitError(f"{weights}: {e}") from None
    check_weights(weights, network.state_dict(), tensors)
    try:
        check_inference_fits(network.config(), 1, torch.device(device),
                             fix="its metadata is damaged, or it was made for a larger machine")
    except VggkitError as e:
        raise VggkitError(f"{weights}: {e}") from None


def _described_network(config: dict, tensors: dict) -> VGG:
    """The VGG the metadata describes, on the meta device (no memory), once its number of tensors is
    the file's: a description of millions of layers is refused before a module is made."""
    from .specs import parse_arch

    if not isinstance(config, dict):
        raise VggkitError(f"the model description must be a table of VGG arguments, got {_short(config)}")
    if isinstance(config.get("arch"), str) and isinstance(config.get("batch_norm"), bool):
        convs = sum(n for n, _ in parse_arch(config["arch"], config.get("ratio", 1)))
        expected = convs * (7 if config["batch_norm"] else 2) + 6  # conv weight, bias (+ 5 batch norm); 3 dense
        held = sum(not key.startswith(EMA_PREFIX) for key in tensors)
        if expected != held:
            raise VggkitError(f"the metadata describes a network of {expected:,} tensors ({convs:,} convolutions), "
                              f"the file holds {held:,}: they disagree (the file is damaged); use another checkpoint")
    with torch.device("meta"):
        return VGG.from_config(config)


def check_weights(weights: Path, expected: dict[str, torch.Tensor], tensors: dict | None = None,
                  network: str = "the network its metadata describes") -> None:
    """The file's tensors, raw and (if any) averaged, against a network's state dict (`network` names
    it): the same names and shapes; floating point (num_batches_tracked: an integer). Read from the
    header only."""
    tensors = file_tensors(weights) if tensors is None else tensors
    raw = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    averaged = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    for label, held in (("", raw), ("averaged ", averaged)):
        if not held and label:
            continue
        missing = [k for k in expected if k not in held]
        unexpected = [k for k in held if k not in expected]
        if missing or unexpected:
            what = f"no {label}{missing[0]}" if missing else f"an unexpected {label}{unexpected[0]}"
            raise VggkitError(f"{weights} does not hold {network} ({what}): the file is damaged; use another "
                              "checkpoint")
        for key, tensor in expected.items():
            shape, dtype = held[key]
            if shape != tuple(tensor.shape):
                raise VggkitError(f"{weights}: {label}{key} is {_shape(shape)} in the file, {_shape(tensor.shape)} in "
                                  f"{network}: the file is damaged; use another checkpoint")
            allowed = COUNTER_DTYPES if key.endswith(COUNTER) else FLOAT_DTYPES
            if dtype not in allowed:
                kind = "an integer" if key.endswith(COUNTER) else "floating point"
                raise VggkitError(f"{weights}: {label}{key} holds {dtype} values, not {kind}: these are not trained "
                                  "weights (the file is damaged or was written by something else); use another "
                                  "checkpoint")


def check_meta_values(meta: dict, network: VGG) -> None:
    """The metadata's preprocessing and class names, by type and range, against the network."""
    from .data.image import max_image_pixels
    from .preprocess import interpolation_of

    if "classes" in meta:
        classes = meta["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) \
                or len(classes) != network.num_classes:
            raise VggkitError(f"its metadata's classes must be a list of {network.num_classes} names (one per output "
                              f"of the network), got {_short(classes)}; use another checkpoint")
    for key in ("mean", "std"):
        if key in meta:
            _check_statistic(key, meta[key], network.in_channels)
    if "input_size" in meta:
        size = _size_pair(meta["input_size"])
        if size != tuple(network.input_size):
            raise VggkitError(f"its metadata's input_size {_short(meta['input_size'])} is not the network's "
                              f"{network.input_size[0]}x{network.input_size[1]}; use another checkpoint")
    if "image_size" in meta:
        size = _size_pair(meta["image_size"], "image_size")
        if size[0] * size[1] > max_image_pixels():
            raise VggkitError(f"its metadata's image_size {size[0]}x{size[1]} is more pixels than any image vggkit "
                              f"reads ({max_image_pixels():,}, Pillow's limit); use another checkpoint")
    interpolation_of(meta)
    for key, kind in (("dataset", str), ("is_sample", bool)):
        if key in meta and not isinstance(meta[key], kind):
            raise VggkitError(f"its metadata's {key} must be {'a string' if kind is str else 'true or false'}, got "
                              f"{_short(meta[key])}; use another checkpoint")


def _check_statistic(key: str, value, channels: int) -> None:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(min(abs(v), 1e300) if
               isinstance(v, int) else v) for v in values):
        raise VggkitError(f"its metadata's {key} must be finite numbers (one per input channel), got {_short(value)}; "
                          "use another checkpoint")
    if len(values) not in (1, channels):
        need = "1 value" if channels == 1 else f"1 or {channels} values"
        raise VggkitError(f"its metadata's {key} has {len(values)} values for {channels}-channel images; it takes "
                          f"{need}: use another checkpoint")
    if key == "std" and not all(v > 0 for v in values):
        raise VggkitError(f"its metadata's std must be positive, got {_short(value)}; use another checkpoint")


def _size_pair(value, name: str = "input_size") -> tuple[int, int]:
    pair = [value, value] if isinstance(value, int) else value
    if not isinstance(pair, list) or len(pair) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise VggkitError(f"its metadata's {name} must be a positive integer or a [height, width] pair, got "
                          f"{_short(value)}; use another checkpoint")
    return pair[0], pair[1]


def with_defaults(meta: dict, model: VGG) -> dict:
    """meta with classes, mean, std and input_size filled in where the file has none (export's defaults)."""
    channels = model.in_channels
    return {"classes": [str(i) for i in range(model.num_classes)], "mean": [0.0] * channels, "std": [1.0] * channels,
            "input_size": list(model.input_size), **meta}


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def _short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a message stays one short line whatever the file holds."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# The training state (state.pt) a resumed run reads: its keys and their types.
STATE_KEYS = {"optimizer": dict, "rng_cpu": torch.Tensor, "epoch": int, "batch": int, "step": int,
              "sums": torch.Tensor, "best_val": (int, float), "history": str}
STATE_OPTIONAL = {"rng_cuda": (torch.Tensor, type(None)), "world_size": int, "seconds": (int, float)}


def check_training_state(state, path: Path) -> dict:
    """The training state of a checkpoint as save_last writes it, or a VggkitError naming what is wrong."""
    def damaged(problem: str) -> VggkitError:
        return VggkitError(f"training state {path} {problem}: the checkpoint is damaged; start a new run or restore "
                           "the file")

    if not isinstance(state, dict):
        raise damaged(f"holds {type(state).__name__}, not the table of training state vggkit writes")
    for key, kind in (*STATE_KEYS.items(), *STATE_OPTIONAL.items()):
        if key not in state:
            if key in STATE_KEYS:
                raise damaged(f"has no {key!r}")
            continue
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise damaged(f"has a {key!r} of type {type(value).__name__}")
    if min(state["epoch"], state["batch"] + 1, state["step"] + 1) < 1 or state["sums"].numel() != 3 \
            or state["rng_cpu"].dtype != torch.uint8:
        raise damaged("has an epoch, batch, step, sums or random state out of range")
    try:
        history = json.loads(state["history"])
    except (ValueError, RecursionError):
        raise damaged("has a history that is not readable JSON") from None
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise damaged("has a history that is not a list of epochs")
    return state
