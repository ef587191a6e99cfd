"""Initial weights for fine-tuning: where they come from, how they fit the new data, what stays frozen.

    model, meta = init_model("vgg16", num_classes=10, in_channels=1, input_size=32, freeze=2)
    ...                      # model.train() keeps the frozen blocks' batch norms in eval mode

A source is a vggkit run directory, checkpoint directory or model.safetensors (with vggkit
metadata: checkpoint.load_model), a state dict in the standard (torchvision) layout as .pth/.pt
(torch.load with weights_only=True) or .safetensors without vggkit metadata (convert.load_standard),
or one of the names in STANDARD_WEIGHTS: torchvision's ImageNet weights, downloaded once from
their published address into ($XDG_CACHE_HOME or ~/.cache)/vggkit/weights/ and checked against
the published hash (the hex digits in the file name start the file's SHA-256). A download is
written under a temporary name and renamed only once verified; a cached file is trusted as it is.

Adapting to the new data (init_model / adapt), each step reported through `log`:
- the architecture comes from the weights; arch, batch_norm or fc_width, when given, must match;
- a different number of classes gets a new last layer (VGG.reset_classifier);
- RGB weights on 1-channel data: the first convolution is summed over its input channels (and
  1-channel weights on C channels spread over them, divided by C); the expected mean/std follow;
- another input size: the feature map no longer fits the classifier unless the model pools it to
  7x7 first, so weights whose classifier takes 7x7 (the ImageNet ones) get head_pool="adaptive".
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError

import torch

from .checkpoint import load_model
from .convert import load_standard
from .data.dataset import IMAGENET_MEAN, IMAGENET_STD  # photos are normalised with them too
from .errors import VggkitError
from .model import POOLED_SIZE, VGG, feature_size
from .special_files import refuse_special
from .specs import format_arch, parse_arch

IMAGENET_SIZE = 224

# torchvision's published ImageNet weights (IMAGENET1K_V1), under BASE_URL. Tests point BASE_URL elsewhere.
BASE_URL = "https://download.pytorch.org/models/"
STANDARD_WEIGHTS = {
    "vgg11": "vgg11-8a719046.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
}
_HASH_PREFIX = re.compile(r"-([0-9a-f]+)\.pth$")
FIRST_CONV = "features.0.0.weight"
MUST_MATCH = ("arch", "batch_norm", "fc_width")  # fixed by the weights' shapes
MAY_CHANGE = ("dropout", "init")  # no shape: taken as given

Log = Callable[[str], None]


def init_model(source, *, num_classes: int | None = None, in_channels: int | None = None,
               input_size: int | tuple[int, int] | None = None, head_pool: str | None = None,
               freeze: int | str = 0, cache_dir=None, progress: bool = True, log: Log = print,
               **options) -> tuple[VGG, dict]:
    """A VGG holding the weights at `source`, fitted to the data described; returns (model, meta).

    What is not given is kept from the weights. `options`: arch, batch_norm, fc_width (checked
    against the weights), dropout, init (used for a new classifier layer). meta holds the
    preprocessing the weights expect (mean, std; ImageNet's for standard weights) and the source.
    """
    model, meta = load_init(source, cache_dir=cache_dir, progress=progress, log=log)
    model, meta = adapt(model, meta, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                        head_pool=head_pool, log=log, **options)
    if freeze:
        freeze_blocks(model, freeze, log=log)
    return model, meta


def load_init(source, *, cache_dir=None, progress: bool = True, log: Log = print) -> tuple[VGG, dict]:
    """The model stored at `source` as it is (eval mode, CPU), and its meta (see the module docstring)."""
    path, name = Path(source), str(source).strip().lower()
    if not path.exists() and name in STANDARD_WEIGHTS:
        path = standard_weights(name, cache_dir=cache_dir, progress=progress, log=log)
        return load_standard(path), _imagenet_meta(f"{name} (torchvision ImageNet weights, {path.name})")
    if not path.exists():
        raise VggkitError(f"no weights at {source}: give a vggkit run or checkpoint directory, a .pth, .pt or "
                          f".safetensors file, or one of {', '.join(STANDARD_WEIGHTS)}")
    refuse_special(path, "initial weights")
    if path.is_dir() or _has_vggkit_metadata(path):
        model, meta = load_model(path)
        return model, {**{k: v for k, v in meta.items() if k != "model"}, "source": str(path)}
    model = load_standard(path)
    if (model.in_channels, model.num_classes) == (3, 1000):
        log(f"{path.name}: standard-layout weights with 3 channels and 1000 classes, taken as ImageNet weights "
            f"(ImageNet mean/std)")
        return model, _imagenet_meta(str(path))
    return model, {"source": str(path), "input_size": list(model.input_size)}


def adapt(model: VGG, meta: dict | None = None, *, num_classes: int | None = None, in_channels: int | None = None,
          input_size: int | tuple[int, int] | None = None, head_pool: str | None = None, log: Log = print,
          **options) -> tuple[VGG, dict]:
    """A new VGG with `model`'s weights for other classes, channels or input size; returns (model, meta)."""
    config, meta = model.config(), dict(meta or {})
    state = model.state_dict()
    target = {**config, **_changeable_options(config, options)}
    if in_channels is not None and in_channels != config["in_channels"]:
        state[FIRST_CONV], note = adapt_input_channels(state[FIRST_CONV], in_channels)
        log(note)
        target["in_channels"] = in_channels
        meta.update(_channel_stats(meta, in_channels))
    if input_size is not None:
        target["input_size"] = input_size
    target["head_pool"] = _choose_head_pool(config, target["input_size"], head_pool, log)
    adapted = VGG(**target)
    _load_exactly(adapted, state)
    if num_classes is not None and num_classes != config["num_classes"]:
        adapted.reset_classifier(num_classes)
        meta.pop("classes", None)
        log(f"classifier replaced: the weights have {config['num_classes']} classes, the data {num_classes} "
            f"(a new last layer, {adapted.init} init)")
    meta["input_size"] = list(adapted.input_size)
    return adapted, meta


def freeze_blocks(model: VGG, blocks: int | str, log: Log = print) -> int:
    """Freeze the first `blocks` blocks ("features": all of them), batch-norm statistics included.

    The frozen blocks get no gradients and stay in eval mode through model.train() (VGG.train), so
    an optimizer leaves them, and their running statistics, bit for bit as they are.
    Returns the number of blocks frozen.
    """
    total = len(model.features)
    if blocks == "features":
        n = total
    elif isinstance(blocks, str) and blocks.strip().isdigit():
        n = int(blocks)
    else:
        n = blocks
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= total:
        raise VggkitError(f"freeze takes a number of blocks from 0 to {total} or 'features', got {blocks!r}")
    model.freeze_blocks(n)
    if n:
        log(f"froze block{'s 1-' if n > 1 else ' '}{n} of {total} (weights and batch-norm statistics)")
    return n


def adapt_input_channels(weight: torch.Tensor, channels: int) -> tuple[torch.Tensor, str]:
    """The first convolution's weight for `channels` input channels, and a note saying what was done."""
    have = weight.shape[1]
    if channels == 1:
        return weight.sum(dim=1, keepdim=True), (
            f"first convolution summed over its {have} input channels for 1-channel data")
    if have == 1:
        return weight.repeat(1, channels, 1, 1) / channels, (
            f"first convolution's single input channel spread over {channels} channels (divided by {channels})")
    raise VggkitError(f"cannot fit weights for {have} input channels to {channels}-channel data; "
                      f"use {have}-channel (or 1-channel) data")


def standard_weights(name: str, *, cache_dir=None, progress: bool = True, log: Log = print) -> Path:
    """The cached file of STANDARD_WEIGHTS[name], downloaded and verified first if missing."""
    file = STANDARD_WEIGHTS[name]
    directory = Path(cache_dir) if cache_dir is not None else _weights_cache()
    path = directory / file
    if path.is_file():
        return path
    url = BASE_URL.rstrip("/") + "/" + file
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VggkitError(f"cannot create the weights cache {directory} ({e.strerror}); set XDG_CACHE_HOME") from None
    log(f"downloading {url}")
    unverified = directory / f".{file}.{os.getpid()}.unverified"
    try:
        _download(url, unverified, progress)
        _verify_hash(unverified, file, url)
        os.replace(unverified, path)
    finally:
        unverified.unlink(missing_ok=True)
    return path


def _download(url: str, path: Path, progress: bool) -> None:
    from .data.download import download_file

    try:
        download_file(url, path, None, progress=progress)
    # HTTP and network errors, a short body, a bad URL: all mean the same thing to the user.
    except Exception as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, HTTPError) else getattr(e, "reason", None) or e
        raise VggkitError(f"cannot download {url} ({reason}); check the connection, or download the file "
                          f"yourself and give its path") from None


def _verify_hash(path: Path, file: str, url: str) -> None:
    expected = _HASH_PREFIX.search(file)[1]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if not digest.hexdigest().startswith(expected):
        raise VggkitError(f"{url} has SHA-256 {digest.hexdigest()[:16]}..., not the published {expected}...; "
                          f"the download was corrupted or altered and was not kept: try again")


def _weights_cache() -> Path:
    from .data import cache_dir

    return cache_dir("weights")


def _has_vggkit_metadata(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "vggkit" in (f.metadata() or {})
    except Exception:  # not readable as safetensors: load_standard names the problem
        return False


def _imagenet_meta(source: str) -> dict:
    return {"source": source, "dataset": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "input_size": [IMAGENET_SIZE, IMAGENET_SIZE]}


def expected_stats(meta: dict, channels: int) -> tuple[tuple, tuple] | None:
    """(mean, std) that weights with this meta expect of `channels`-channel images, or None where it
    does not say (standard weights of unknown origin)."""
    if "mean" not in meta or "std" not in meta:
        return None
    have = len(meta["mean"])
    stats = meta if have == channels else {**meta, **_channel_stats(meta, channels)} if have in (1, 3) else None
    if stats is None or len(stats["mean"]) != channels:
        return None
    return tuple(float(v) for v in stats["mean"]), tuple(float(v) for v in stats["std"])


def _channel_stats(meta: dict, channels: int) -> dict:
    """The mean/std to expect once the first convolution takes `channels` inputs."""
    stats = {}
    for key in ("mean", "std"):
        if key in meta:
            values = list(meta[key])
            stats[key] = [sum(values) / len(values)] if channels == 1 else values * channels
    return stats


def _changeable_options(config: dict, options: dict) -> dict:
    """The options that may differ from the weights (dropout, init); the others must match them."""
    unknown = sorted(set(options) - {*MUST_MATCH, *MAY_CHANGE, "ratio"})
    if unknown:
        raise VggkitError(f"unknown model option {unknown[0]!r} for initial weights; "
                          f"give {', '.join(MUST_MATCH + MAY_CHANGE)} (and ratio, with arch)")
    given = {key: options[key] for key in MUST_MATCH if options.get(key) is not None}
    if "arch" in given:  # compared as blocks: a preset name or a ratio may spell the same ones
        given["arch"] = format_arch(parse_arch(given["arch"], options.get("ratio") or 1))
    for key, wanted in given.items():
        if wanted != config[key]:
            raise VggkitError(f"the initial weights have {key} {config[key]}, not {wanted}; "
                              f"drop {key} (it comes from the weights) or choose other weights")
    return {key: options[key] for key in MAY_CHANGE if options.get(key) is not None}


def _choose_head_pool(config: dict, input_size, asked: str | None, log: Log) -> str:
    """The weights' own pool if it fits the input size; else adaptive, when their classifier takes 7x7."""
    if asked is not None or config["head_pool"] == "adaptive":
        return asked or "adaptive"
    arch = parse_arch(config["arch"])
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    trained, now = feature_size(arch, tuple(config["input_size"])), feature_size(arch, size)
    if now == trained:
        return "none"
    if trained == POOLED_SIZE:
        log(f"input {size[0]}x{size[1]} gives a {now[0]}x{now[1]} feature map; the classifier takes 7x7: "
            f"head_pool adaptive (as the standard VGG)")
        return "adaptive"
    raise VggkitError(
        f"the classifier of these weights takes a {trained[0]}x{trained[1]} feature map (input "
        f"{config['input_size'][0]}x{config['input_size'][1]}) and input {size[0]}x{size[1]} gives "
        f"{now[0]}x{now[1]}; use input size {config['input_size'][0]} (only a 7x7 map can be pooled to)"
    )


def _load_exactly(model: VGG, state: dict) -> None:
    """load_state_dict with one-line errors naming the first missing key or mismatched shape."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise VggkitError(f"the weights have no {key!r}; they are not a VGG of this shape")
        if state[key].shape != tensor.shape:
            c = model.config()
            raise VggkitError(
                f"{key} has shape {tuple(state[key].shape)} in the weights but {tuple(tensor.shape)} in a VGG "
                f"{c['arch']} at input {c['input_size'][0]}x{c['input_size'][1]} with head_pool {c['head_pool']}"
            )
    model.load_state_dict(state)
