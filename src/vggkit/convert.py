"""Weights in the standard (torchvision) VGG layout <-> vggkit's VGG.

Standard layout (torchvision models/vgg.py): `features.<i>` indexes one flat Sequential of
Conv2d, [BatchNorm2d], ReLU and MaxPool2d; `classifier.<i>` has its Linears at 0, 3 and 6.
vggkit nests the features in blocks, `features.<block>.<j>`, and its classifier starts with a
Flatten, so its Linears sit at 1, 4 and 7.

Pools and ReLUs have no parameters, so a state dict shows only where the convs (and batch norms)
are. Each conv takes 2 indices (conv, ReLU) or 3 with batch norm (conv, BN, ReLU), and each
MaxPool one more: consecutive convs 2 (3) apart share a block; 3 (4) apart have a pool between
them and start a new block. Every block ends with a pool.

torchvision's VGG has an AdaptiveAvgPool2d(7x7) before the classifier; vggkit's VGG has it only
with head_pool="adaptive" (neither has parameters, so the state dicts agree either way).
from_standard, when not told input_size, infers it from the first Linear (in = channels x s x s,
input = s x 2^blocks: 224 for the ImageNet models) with head_pool="none": at that size both
networks compute the same function. Told an input_size whose feature map does not fit the first
Linear but whose 7x7 pooling does (the ImageNet weights at 32x32, say), it infers
head_pool="adaptive", which is then again torchvision's function at that size.
"""
from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path

import torch

from .errors import VggkitError
from .model import POOLED_SIZE, VGG, feature_size
from .specs import format_arch, parse_arch

_VGGKIT_KEY = re.compile(r"^features\.(\d+)\.(\d+)\.(\w+)$|^classifier\.(\d+)\.(\w+)$")
_STANDARD_KEY = re.compile(r"^features\.(\d+)\.(\w+)$")


def to_standard(state_dict_or_model) -> dict[str, torch.Tensor]:
    """A vggkit VGG (or its state dict) as a state dict in the torchvision layout."""
    state = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, torch.nn.Module) else state_dict_or_model
    names = _standard_names(list(state))
    return {names[key]: tensor for key, tensor in state.items()}


def from_standard(state_dict, arch=None, batch_norm=None, num_classes=None, in_channels=None, **vgg_kwargs) -> VGG:
    """A vggkit VGG holding `state_dict` (torchvision layout); what is not given is read from the tensors.

    Other keyword arguments go to VGG (input_size, fc_width, dropout, head_pool, ...); head_pool,
    when not given, is inferred from input_size (module docstring). The model is returned
    in eval mode on the CPU; meta-device tensors give a meta-device model (shape checks, no memory).
    """
    state = dict(state_dict)
    needs = {"arch": arch, "batch_norm": batch_norm, "num_classes": num_classes, "in_channels": in_channels,
             "fc_width": vgg_kwargs.get("fc_width"), "input_size": vgg_kwargs.get("input_size")}
    if any(v is None for v in needs.values()):
        inferred = _infer(state, vgg_kwargs.get("input_size"))
        needs = {k: inferred[k] if v is None else v for k, v in needs.items()}
    if vgg_kwargs.get("head_pool") is None:
        needs["head_pool"] = _infer_head_pool(state, needs["arch"], needs["input_size"], vgg_kwargs.get("ratio", 1))
    with torch.device("meta"):  # no memory and no init: every tensor is filled from state_dict below
        model = VGG(**{**vgg_kwargs, **needs})
    if not any(t.is_meta for t in state.values()):
        model = model.to_empty(device="cpu")

    expected = model.state_dict()
    mine = {std: key for key, std in _standard_names(list(expected)).items()}
    converted = {}
    for key, tensor in state.items():
        if key not in mine:
            raise VggkitError(f"unexpected key {key!r} for a {_describe(model)}; check the arch/batch_norm arguments")
        want = expected[mine[key]].shape
        if tensor.shape != want:
            raise VggkitError(f"{key} has shape {tuple(tensor.shape)}, expected {tuple(want)} for a {_describe(model)}")
        converted[mine[key]] = tensor
    for std, key in mine.items():
        if key in converted:
            continue
        if not std.endswith("num_batches_tracked"):
            raise VggkitError(f"missing key {std!r} for a {_describe(model)}; the state dict is incomplete")
        converted[key] = torch.zeros_like(expected[key])  # absent from checkpoints older than PyTorch 0.4.1
    model.load_state_dict(converted)
    return model.eval()


def load_standard(path, **kwargs) -> VGG:
    """from_standard on a .pth/.pt (torch.load, weights_only) or .safetensors file.

    The file holds a state dict in the standard layout (or vggkit's own: it is converted first),
    possibly under a "state_dict" key. A file that needs pickle code is refused, naming what it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise VggkitError(f"no weights file at {path}; give a .pth, .pt or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt"):
            with warnings.catch_warnings():  # about a pickle it then reads or refuses: _pickle_problem says which
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise VggkitError(f"cannot tell the format of {path.name}; use a .pth, .pt or .safetensors file")
    except VggkitError:
        raise
    except pickle.UnpicklingError as e:
        raise VggkitError(f"cannot read weights from {path}: {_pickle_problem(e, path)}") from None
    except Exception as e:  # zip and safetensors errors all mean "not a weights file"
        if path.suffix != ".safetensors" and not _is_zip(path):  # torch.load read it as a pickle: any error
            raise VggkitError(f"cannot read weights from {path}: {_pickle_problem(e, path)}") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # torch's runs to a paragraph
        raise VggkitError(f"cannot read weights from {path}: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VggkitError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    for key, tensor in state.items():
        if not (tensor.is_floating_point() or key.endswith("num_batches_tracked") and tensor.dtype in COUNTERS):
            raise VggkitError(f"{path}: {key} holds {str(tensor.dtype).removeprefix('torch.')} values, not floating "
                              "point: these are not trained weights (the file is damaged or was written by something "
                              "else); choose other weights")
    if state and all(_VGGKIT_KEY.match(key) for key in state):  # torch.save(vggkit_model.state_dict())
        state = to_standard(state)
    return from_standard(state, **kwargs)


COUNTERS = (torch.int64, torch.int32)  # batch norm's num_batches_tracked: a step count
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6: a zip archive


def _is_zip(path: Path) -> bool:
    """Whether the file starts as a zip archive does (torch.save's format since PyTorch 1.6)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _pickle_problem(error: pickle.UnpicklingError, path: Path) -> str:
    """torch.load(weights_only=True)'s many-line refusal as one clause naming what the file holds:
    pickled objects that need code, another pickle, or no pickle at all (random bytes, another format)."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    if found:
        return (f"it holds a pickled {found[1]}, which needs pickle code to load (refused: weights only); "
                "save model.state_dict() with torch.save, or a .safetensors file")
    try:
        with open(path, "rb") as f:
            start = f.read(4)
    except OSError:
        start = b""
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO n: a pickle
        reason = next((line.strip() for line in str(error).splitlines() if "operand" in line or "opcode" in line),
                      "a pickle torch.load cannot read as weights")
        return (f"it is a pickle, but not one torch.save writes ({reason}); save model.state_dict() with "
                "torch.save, or a .safetensors file")
    return (f"it is not a PyTorch weights file: neither a zip archive (torch.save) nor a pickle (it starts with "
            f"{start.hex(' ') or 'nothing'}); give a .pth/.pt file saved by torch.save, or a .safetensors file")


def _standard_names(keys: list[str]) -> dict[str, str]:
    """vggkit key -> standard key. A block is as long as its last parameter index + 3 (ReLU, pool)."""
    parsed = {}
    for key in keys:
        m = _VGGKIT_KEY.match(key)
        if not m or (m[4] is not None and int(m[4]) == 0):
            raise VggkitError(f"unexpected key {key!r}: not a vggkit VGG state dict (features.<block>.<j>.*, classifier.<i>.*)")
        parsed[key] = m
    last: dict[int, int] = {}
    for m in parsed.values():
        if m[1] is not None:
            last[int(m[1])] = max(last.get(int(m[1]), 0), int(m[2]))
    if sorted(last) != list(range(len(last))):
        missing = min(set(range(len(last) + 1)) - set(last))
        raise VggkitError(f"the features have no block {missing} but later ones; not a vggkit VGG state dict")
    offsets = [0]
    for block in range(len(last)):
        offsets.append(offsets[-1] + last[block] + 3)
    names = {}
    for key, m in parsed.items():
        if m[1] is not None:
            names[key] = f"features.{offsets[int(m[1])] + int(m[2])}.{m[3]}"
        else:
            names[key] = f"classifier.{int(m[4]) - 1}.{m[5]}"
    return names


def _infer(state: dict, input_size=None) -> dict:
    """arch, batch_norm, in_channels, num_classes, fc_width and input_size from standard-layout shapes."""
    convs, norms = {}, set()
    for key, tensor in state.items():
        m = _STANDARD_KEY.match(key)
        if m and m[2] == "weight" and tensor.dim() == 4:
            convs[int(m[1])] = tensor.shape
        elif m and m[2] == "running_mean":
            norms.add(int(m[1]))
    if not convs:
        first = next(iter(state), None)
        raise VggkitError(
            f"no conv weights features.<i>.weight found (first key: {first!r}); expected a torchvision-style VGG state dict"
        )
    batch_norm = bool(norms)
    step = 3 if batch_norm else 2  # indices per conv: conv, [BN,] ReLU
    indices = sorted(convs)
    if indices[0] != 0:
        raise VggkitError(f"the first conv is features.{indices[0]}, expected features.0; not a standard VGG layout")
    blocks = [[convs[0][0]]]
    for before, index in zip(indices, indices[1:]):
        gap = index - before
        if gap == step + 1:  # a MaxPool in between: new block
            blocks.append([])
        elif gap != step:
            raise VggkitError(
                f"features.{index}.weight is {gap} indices after the previous conv; a standard VGG "
                f"{'with' if batch_norm else 'without'} batch norm has {step} (same block) or {step + 1} (after a pool)"
            )
        blocks[-1].append(convs[index][0])
    for i, widths in enumerate(blocks, start=1):
        if len(set(widths)) > 1:
            raise VggkitError(f"block {i} mixes widths {sorted(set(widths))}; a vggkit block has one width (pass arch=)")
    first, last = _tensor(state, "classifier.0.weight"), _tensor(state, "classifier.6.weight")
    if input_size is None:
        channels = blocks[-1][0]
        side = math.isqrt(first.shape[1] // channels)
        if channels * side * side != first.shape[1]:
            raise VggkitError(
                f"classifier.0.weight takes {first.shape[1]} inputs, not {channels} x s x s; pass input_size="
            )
        input_size = side * 2 ** len(blocks)
    return {
        "arch": format_arch(tuple((len(w), w[0]) for w in blocks)), "batch_norm": batch_norm,
        "in_channels": convs[0][1], "num_classes": last.shape[0], "fc_width": first.shape[0], "input_size": input_size,
    }


def _infer_head_pool(state: dict, arch, input_size, ratio: int) -> str:
    """"none" when the first Linear takes the feature map at input_size as it is, "adaptive" when it takes 7x7."""
    inputs = _tensor(state, "classifier.0.weight").shape[1]
    blocks = parse_arch(arch, ratio)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    channels, (height, width) = blocks[-1][1], feature_size(blocks, size)
    if channels * height * width == inputs:
        return "none"
    pooled = channels * POOLED_SIZE[0] * POOLED_SIZE[1]
    if pooled == inputs:
        return "adaptive"
    raise VggkitError(
        f"classifier.0.weight takes {inputs} inputs but the {channels}x{height}x{width} feature map at input "
        f"{size[0]}x{size[1]} gives {channels * height * width} ({pooled} pooled to 7x7); pass a matching input_size"
    )


def _tensor(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise VggkitError(f"missing key {key!r}; expected a torchvision-style VGG classifier (Linears at 0, 3, 6)")
    return state[key]


def _describe(model: VGG) -> str:
    c = model.config()
    return (f"VGG {c['arch']}{' with batch norm' if c['batch_norm'] else ''}, {c['in_channels']} input channels, "
            f"{c['num_classes']} classes, input {c['input_size'][0]}x{c['input_size'][1]}")
