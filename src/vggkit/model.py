"""The VGG block and the VGG network (features from blocks, then a three-layer classifier)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import VggkitError
from .specs import PRESET_IN_CHANNELS, Arch, format_arch, parse_arch


def vgg_block(num_convs: int, in_channels: int, out_channels: int, batch_norm: bool = False) -> nn.Sequential:
    """num_convs x (3x3 conv, padding 1 [, batch norm], ReLU), then a 2x2 max-pool, stride 2."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def feature_size(arch: Arch, input_size: tuple[int, int]) -> tuple[int, int]:
    """Height and width after all pooling blocks; an error names the block where it reaches zero."""
    height, width = input_size
    for i in range(1, len(arch) + 1):
        height, width = height // 2, width // 2
        if height == 0 or width == 0:
            need = 2 ** len(arch)
            raise VggkitError(
                f"input {input_size[0]}x{input_size[1]} is too small: the feature map reaches 0 at block {i} "
                f"of {len(arch)}; use an input size of at least {need} or at most {i - 1} blocks"
            )
    return height, width


class VGG(nn.Module):
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
    ):
        super().__init__()
        if in_channels is None:
            in_channels = PRESET_IN_CHANNELS.get(arch, 3) if isinstance(arch, str) else 3
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("fc_width", fc_width)):
            if not isinstance(value, int) or value < 1:
                raise VggkitError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dropout < 1:
            raise VggkitError(f"dropout must be in [0, 1), got {dropout}")
        if init not in INITS:
            raise VggkitError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self.arch = parse_arch(arch, ratio)
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if min(self.input_size) < 1:
            raise VggkitError(f"input size must be positive, got {input_size}")
        self.in_channels, self.num_classes = in_channels, num_classes
        if scale_fc:
            fc_width = max(1, fc_width // ratio)
        self.fc_width, self.dropout, self.batch_norm = fc_width, dropout, batch_norm

        blocks, channels = [], in_channels
        for num_convs, out_channels in self.arch:
            blocks.append(vgg_block(num_convs, channels, out_channels, batch_norm))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        height, width = feature_size(self.arch, self.input_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(fc_width, num_classes),
        )
        INITS[init](self)

    def config(self) -> dict:
        """Keyword arguments that rebuild this network (widths already divided by the ratio)."""
        return {
            "arch": format_arch(self.arch), "in_channels": self.in_channels, "num_classes": self.num_classes,
            "input_size": list(self.input_size), "fc_width": self.fc_width, "dropout": self.dropout,
            "batch_norm": self.batch_norm,
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _xavier(model: nn.Module) -> None:
    # The textbook's init.Xavier(): uniform weights, zero biases, on every conv and dense layer.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _kaiming(model: nn.Module) -> None:
    # As in the reference implementations (torchvision): He-normal convs, N(0, 0.01) dense.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


INITS = {"xavier": _xavier, "kaiming": _kaiming}
