"""Named intermediate outputs of a VGG, for perceptual losses, style transfer and probing.

Names, numbered from 1 as in the VGG paper: `blockB` is the output of block B (after its
max-pool); inside it `blockB.convK`, `blockB.bnK` (with batch norm) and `blockB.reluK` are the
outputs of its K-th convolution, batch norm and ReLU. So `block3.relu3` is the literature's
relu3_3 (torchvision vgg16 `features[15]`). layer_names(model) lists them in network order.

FeatureExtractor runs the blocks only as far as the deepest layer asked for, and returns a dict
of the outputs in the order asked. Given the mean and std the weights expect (from_pretrained
reads them from the checkpoint's metadata; ImageNet's for the standard weights), it takes
images in [0, 1] and normalises them itself. It shares the model's parameters.

A perceptual loss on VGG-16's ImageNet features (`vggkit.pretrained` names and sources):

    import torch
    from vggkit.features import FeatureExtractor

    extractor = FeatureExtractor.from_pretrained("vgg16", ["block1.relu2", "block2.relu2", "block3.relu3"])
    extractor.eval().requires_grad_(False)  # a fixed measure: no training, no batch statistics

    def perceptual_loss(output, target):  # N x 3 x H x W images in [0, 1]
        mine, theirs = extractor(output), extractor(target)
        return sum(torch.nn.functional.mse_loss(mine[k], theirs[k]) for k in mine)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import VggkitError
from .model import VGG

_KINDS = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.ReLU: "relu"}


def named_layers(model: VGG) -> list[tuple[str, nn.Module]]:
    """(name, module) for every layer of the blocks, in network order; a block's pool is named by the block."""
    layers = []
    for b, block in enumerate(model.features, start=1):
        counts = dict.fromkeys(_KINDS.values(), 0)
        for module in block:
            if isinstance(module, nn.MaxPool2d):
                layers.append((f"block{b}", module))
                continue
            kind = _KINDS[type(module)]
            counts[kind] += 1
            layers.append((f"block{b}.{kind}{counts[kind]}", module))
    return layers


def layer_names(model: VGG) -> list[str]:
    return [name for name, _ in named_layers(model)]


class FeatureExtractor(nn.Module):
    """model's outputs at `layers` (see the module docstring), as a dict in the order given."""

    def __init__(self, model: VGG, layers: Sequence[str], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        named = named_layers(model)
        names = [name for name, _ in named]
        for name in layers:
            if name not in names:
                raise VggkitError(f"unknown layer {name!r}; valid names: {', '.join(names)}")
        if not layers or len(set(layers)) != len(layers):
            raise VggkitError(f"give one or more layer names, each once (got {list(layers)}), e.g. {names[-1]!r}")
        depth = max(names.index(name) for name in layers) + 1
        self.names = names[:depth]
        self.steps = nn.ModuleList(module for _, module in named[:depth])
        self.layers = list(layers)
        if (mean is None) != (std is None):
            raise VggkitError("give both mean and std (the weights' normalisation) or neither")
        for values in (mean, std):
            if values is not None and len(values) not in (1, model.in_channels):
                need = "1 value" if model.in_channels == 1 else f"1 or {model.in_channels} values"  # not "1 or 1"
                raise VggkitError(f"mean and std need {need} (one per input channel), got {list(values)}")
        self.normalize = mean is not None
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean or [0.0], dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0], dtype=torch.float32).view(shape), persistent=False)

    @classmethod
    def from_pretrained(cls, source, layers: Sequence[str], **init_options) -> FeatureExtractor:
        """Load `source` (pretrained.load_init: a checkpoint, a weights file or a name like "vgg16")
        with its normalisation; init_options go to pretrained.init_model (e.g. in_channels=1)."""
        from .pretrained import init_model

        init_options.setdefault("log", lambda _: None)
        model, meta = init_model(source, **init_options)
        return cls(model, layers, meta.get("mean"), meta.get("std"))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.normalize:
            x = (x - self.mean) / self.std
        wanted = set(self.layers)
        found = {}
        for name, step in zip(self.names, self.steps):
            # out of place: an in-place ReLU would overwrite a convolution's output already returned
            x = torch.relu(x) if isinstance(step, nn.ReLU) else step(x)
            if name in wanted:
                found[name] = x
        return {name: found[name] for name in self.layers}
