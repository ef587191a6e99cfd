"""The VGG block and the VGG network: features from blocks, a head pool, then a three-layer classifier.

Head API as timm has it: `forward_features(x)` (the blocks), `forward_head(x)` (pool + classifier),
`reset_classifier(num_classes)` (a new last layer). `head_pool` says what joins the two:
"none" flattens the feature map as it is (its size follows from input_size), "adaptive" first
averages it to 7x7 as the standard VGG's AdaptiveAvgPool2d does, so that weights trained at one
input size run at another. Neither has parameters: the state dict is the same for both.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from . import kernels
from .kernels import routing
from .errors import VggkitError
from .specs import PRESET_IN_CHANNELS, Arch, format_arch, parse_arch


def vgg_block(num_convs: int, in_channels: int, out_channels: int, batch_norm: bool = False) -> VGGBlock:
    """num_convs x (3x3 conv, padding 1 [, batch norm], ReLU), then a 2x2 max-pool, stride 2."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return VGGBlock(*layers)


KERNELS = routing.MODES  # how a block computes its batch norms, last ReLU and pool; see VGGBlock


class VGGBlock(nn.Sequential):
    """A VGG block, [conv, (bn), ReLU] x n then the max-pool, in the standard layout (state dict,
    torchvision indices, named features, export), computed in one of three ways (`kernels`, the
    modes of kernels.routing):

    - "reordered": the last ReLU runs after the pool. They commute (max(relu(x)) = relu(max(x));
      gradients agree except at exact zero ties), and the ReLU then touches a quarter of the values;
    - "fast": as "reordered", each part of the block computed by the first of vggkit's CPU kernels
      (vggkit.kernels) that applies to it, in kernels.routing's priority list; PyTorch's ops elsewhere
      (other devices, no kernels, hooks). `kernels.routing.plan_block(block, x)` says which and why;
    - "plain": every layer in order, exactly nn.Sequential.
    TorchScript, tracing (ONNX export) and forward hooks on the pool or the last ReLU get the
    layers in order, so they see the tensors the standard layout names.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        self.kernels = "reordered"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            for layer in self:
                x = layer(x)
            return x
        return self._routed(x)

    @torch.jit.unused
    def _routed(self, x):  # no annotations: TorchScript cannot read postponed ones on an unused method
        return routing.route_block(self, x)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}"


class Dropout(nn.Dropout):
    """nn.Dropout; in the "fast" mode, training on the CPU, its mask comes from random words
    (kernels.dropout: PyTorch's bernoulli_ mask is slow to draw there)."""

    kernels = "reordered"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._fast(x):
            return kernels.dropout(x, self.p)
        return nn.functional.dropout(x, self.p, self.training, self.inplace)

    @torch.jit.unused
    def _fast(self, x):
        return routing.uses("dropout", self, x)


class Linear(nn.Linear):
    """nn.Linear; in the "fast" mode, training on the CPU under bf16 autocast with an optimizer that
    keeps a bfloat16 copy of its weight (kernels.weight_copies), the product takes that copy instead
    of autocast's cast of the weight, and the gradient stays on the copy for the optimizer."""

    kernels = "reordered"
    weight_copy = None  # a kernels.WeightCopy, given by the optimizer that keeps it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._copied(x):
            return kernels.linear_with_copy(self, x)
        return nn.functional.linear(x, self.weight, self.bias)

    @torch.jit.unused
    def _copied(self, x):
        return routing.uses("linear_with_copy", self, x)


def set_kernels(model: nn.Module, mode: str) -> str:
    """Set how every VGGBlock (and classifier Dropout and Linear) of `model` computes (KERNELS, see VGGBlock;
    "fused", the old name of "fast", is taken too); returns the mode set: "fast" becomes "reordered"
    where the C++ kernels cannot be had (the process then says why once on stderr). The state dict is
    the same in every mode."""
    try:
        mode = routing.mode_named(mode)
    except ValueError as e:
        raise VggkitError(str(e)) from None
    if mode == "fast" and not kernels.available():
        mode = "reordered"
    for block in model.modules():
        if isinstance(block, (VGGBlock, Dropout, Linear)):
            block.kernels = mode
    return mode


HEAD_POOLS = ("none", "adaptive")
POOLED_SIZE = (7, 7)  # what the standard VGG's avgpool gives, whatever the input size


def feature_size(arch: Arch, input_size: tuple[int, int]) -> tuple[int, int]:
    """Height and width after all pooling blocks; an error names the block where it reaches zero."""
    height, width = input_size
    for i in range(1, len(arch) + 1):
        height, width = height // 2, width // 2
        if height == 0 or width == 0:
            need = 2 ** len(arch) if len(arch) <= 40 else f"2^{len(arch)}"
            raise VggkitError(
                f"input {input_size[0]}x{input_size[1]} is too small: the feature map reaches 0 at block {i} "
                f"of {len(arch)}; use an input size of at least {need} or at most {i - 1} blocks"
            )
    return height, width


class StaticAdaptiveAvgPool2d(nn.Module):
    """nn.AdaptiveAvgPool2d for an input size known when the model is built, in ops every exporter takes.

    Adaptive pooling averages the window [floor(i*n/m), ceil((i+1)*n/m)) for output i of m from
    n inputs, per axis. The ONNX exporter fails on it when n is not a multiple of m
    (pytorch/pytorch#42653); here the windows are computed once: when n divides evenly it is a
    plain avg_pool2d (nothing at all when n == m), otherwise each axis is sliced and averaged.
    """

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int] = POOLED_SIZE):
        super().__init__()
        self.input_size, self.output_size = tuple(input_size), tuple(output_size)
        self.rows = adaptive_windows(self.input_size[0], self.output_size[0])
        self.cols = adaptive_windows(self.input_size[1], self.output_size[1])
        self.divides = all(n % m == 0 for n, m in zip(self.input_size, self.output_size))
        self.kernel = [n // m for n, m in zip(self.input_size, self.output_size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.divides:
            if self.kernel == [1, 1]:
                return x
            return torch.nn.functional.avg_pool2d(x, self.kernel, self.kernel)
        x = torch.cat([x[:, :, start:end, :].mean(dim=2, keepdim=True) for start, end in self.rows], dim=2)
        return torch.cat([x[:, :, :, start:end].mean(dim=3, keepdim=True) for start, end in self.cols], dim=3)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, output_size={self.output_size}"


def adaptive_windows(n: int, m: int) -> list[tuple[int, int]]:
    """The [start, end) of each of m adaptive-pooling windows over n inputs."""
    return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


class VGG(nn.Module):
    """Blocks (arch, widths divided by ratio), head_pool, then Linear-ReLU-Dropout x 2 and the output layer.

    config() returns the keyword arguments that rebuild it (checkpoints store them).
    """

    def __init__(
        self,
        arch: str | Sequence[Sequence[int]] = "vgg11",
        *,
        ratio: int = 1,
        in_channels: int | None = None,
        num_classes: int = 10,
        input_size: int | tuple[int, int] = 224,
        fc_width: int = 4096,
        dropout: float = 0.5,
        batch_norm: bool = False,
        init: str = "xavier",
        scale_fc: bool = False,
        head_pool: str = "none",
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise VggkitError(f"unknown model argument{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, sorted(unknown)))}; VGG takes {', '.join(ARGUMENTS)}")
        if in_channels is None:
            in_channels = PRESET_IN_CHANNELS.get(arch, 3) if isinstance(arch, str) else 3
        _check_arguments(in_channels=in_channels, num_classes=num_classes, fc_width=fc_width, dropout=dropout,
                         batch_norm=batch_norm, init=init, scale_fc=scale_fc, head_pool=head_pool)
        self.arch = parse_arch(arch, ratio)
        self.input_size = _pair(input_size)
        self.in_channels, self.num_classes = in_channels, num_classes
        if scale_fc:
            fc_width = max(1, fc_width // ratio)
        self.fc_width, self.dropout, self.batch_norm = fc_width, dropout, batch_norm
        self.init, self.head_pool = init, head_pool
        self.frozen_blocks = 0  # set by freeze_blocks; not part of config(): a training choice
        height, width = feature_size(self.arch, self.input_size)
        pooled = POOLED_SIZE if head_pool == "adaptive" else (height, width)
        check_layer_sizes(self.arch, in_channels, pooled, fc_width, num_classes)

        blocks, channels = [], in_channels
        for num_convs, out_channels in self.arch:
            blocks.append(vgg_block(num_convs, channels, out_channels, batch_norm))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.avgpool = StaticAdaptiveAvgPool2d((height, width)) if head_pool == "adaptive" else nn.Identity()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            Linear(channels * pooled[0] * pooled[1], fc_width), nn.ReLU(inplace=True), Dropout(dropout),
            Linear(fc_width, fc_width), nn.ReLU(inplace=True), Dropout(dropout),
            Linear(fc_width, num_classes),
        )
        self.apply(INITS[init])

    def config(self) -> dict:
        """Keyword arguments that rebuild this network (widths already divided by the ratio)."""
        return {
            "arch": format_arch(self.arch), "in_channels": self.in_channels, "num_classes": self.num_classes,
            "input_size": list(self.input_size), "fc_width": self.fc_width, "dropout": self.dropout,
            "batch_norm": self.batch_norm, "init": self.init, "head_pool": self.head_pool,
        }

    @classmethod
    def from_config(cls, config) -> "VGG":
        """The network config() describes (as checkpoint metadata stores it). Every key that shapes
        the weights must be there: a missing one would silently become a default."""
        if not isinstance(config, dict):
            raise VggkitError(f"the model description must be a table of VGG arguments, got {config!r}")
        missing = [key for key in REBUILD_KEYS if key not in config]
        if missing:
            raise VggkitError(f"the model description has no {', '.join(missing)}; VGG.config() writes every one")
        return cls(**config)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the last block (before the head pool)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from forward_features' output; pre_logits=True stops before the last layer."""
        x = self.avgpool(x)
        return self.classifier[:-1](x) if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))

    def reset_classifier(self, num_classes: int) -> None:
        """A new last layer for num_classes outputs, initialised as this model's init does."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise VggkitError(f"num_classes must be a positive integer, got {num_classes!r}")
        old = self.classifier[-1]
        new = Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        new.kernels = getattr(old, "kernels", new.kernels)
        INITS[self.init](new)
        self.classifier[-1] = new
        self.num_classes = num_classes

    def freeze_blocks(self, n: int) -> None:
        """Stop training the first n blocks: no gradients, and their batch norms stay in eval mode."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(self.features):
            raise VggkitError(f"cannot freeze {n!r} blocks of {len(self.features)}; give 0 to {len(self.features)}")
        for i, block in enumerate(self.features):
            block.requires_grad_(i >= n)
        self.frozen_blocks = n
        self.train(self.training)

    def train(self, mode: bool = True):
        # Frozen blocks' batch norms keep their running statistics (eval mode) while the rest trains.
        super().train(mode)
        for block in self.features[:self.frozen_blocks]:
            block.eval()
        return self


ARGUMENTS = ("arch", "ratio", "in_channels", "num_classes", "input_size", "fc_width", "dropout", "batch_norm", "init",
             "scale_fc", "head_pool")
# What from_config needs (dropout, init and head_pool leave the weights' names and shapes as they are).
REBUILD_KEYS = ("arch", "in_channels", "num_classes", "input_size", "fc_width", "batch_norm")
# 8 GiB of float32 weights in one layer: ~20x VGG-16's largest (103M), the bound where a number
# (a typo, damaged metadata) is refused before torch is asked for the memory.
MAX_LAYER_WEIGHTS = 2**31


def _check_arguments(*, in_channels, num_classes, fc_width, dropout, batch_norm, init, scale_fc, head_pool) -> None:
    """Types and ranges of VGG's arguments other than the architecture (specs.parse_arch) and input size."""
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("fc_width", fc_width)):
        if not _is_int(value) or value < 1:
            raise VggkitError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise VggkitError(f"dropout must be in [0, 1), got {dropout!r}")
    for name, value in (("batch_norm", batch_norm), ("scale_fc", scale_fc)):
        if not isinstance(value, bool):
            raise VggkitError(f"{name} must be True or False, got {value!r}")
    for name, value, allowed in (("init", init, INITS), ("head_pool", head_pool, HEAD_POOLS)):
        if not isinstance(value, str) or value not in allowed:
            raise VggkitError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def _pair(input_size) -> tuple[int, int]:
    """input_size as (height, width): an int for a square, or two ints."""
    size = (input_size, input_size) if _is_int(input_size) else input_size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(v) for v in size) or min(size) < 1:
        raise VggkitError(f"input size must be a positive integer or a (height, width) pair, got {input_size!r}")
    return tuple(size)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_layer_sizes(arch: Arch, in_channels: int, pooled: tuple[int, int], fc_width: int, num_classes: int) -> None:
    """Refuse a network with a layer of more than MAX_LAYER_WEIGHTS weights, naming the layer and a fix."""
    layers, channels = [], in_channels
    for i, (num_convs, out_channels) in enumerate(arch, start=1):
        for j in range(1, num_convs + 1):
            layers.append((f"convolution {j} of block {i}", channels * out_channels * 9, "use fewer channels"))
            channels = out_channels
    flat = channels * pooled[0] * pooled[1]
    layers += [("the first dense layer", flat * fc_width, "use a smaller input size or fc_width, or fewer channels "
                "in the last block"),
               ("the second dense layer", fc_width * fc_width, "use a smaller fc_width"),
               ("the output layer", fc_width * num_classes, "use a smaller fc_width")]
    for name, weights, fix in layers:
        if weights > MAX_LAYER_WEIGHTS:
            count = f"{weights:,}" if weights < 10**15 else f"{weights:.1e}"
            raise VggkitError(f"{name} would have {count} weights ({weights * 4 / 2**30:,.3g} GiB in float32), more "
                              f"than the {MAX_LAYER_WEIGHTS:,} a layer may have; {fix}")


def _xavier_layer(m: nn.Module) -> None:
    # The textbook's init.Xavier(): uniform weights, zero biases, on every conv and dense layer.
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def _kaiming_layer(m: nn.Module) -> None:
    # As in the reference implementations (torchvision): He-normal convs, N(0, 0.01) dense.
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)


INITS = {"xavier": _xavier_layer, "kaiming": _kaiming_layer}  # applied to every module, in order
