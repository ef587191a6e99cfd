"""Training configuration: a recipe (RECIPES, picked by the `preset` key or --preset), overridden by a
TOML file and then by flags; saved with the run. Architecture presets (vgg11, ...) are specs.PRESETS."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import VggkitError
from .optim import SCHEDULES, TRAINING_OPTIMIZERS


DEFAULT_RECIPE = "fast"


@dataclass
class TrainConfig:
    """Every field of a training run. The defaults are the `fast` recipe: small VGG blocks, bf16 +
    channels-last on CPU, one-cycle SGD, crop, label smoothing. The FROM_THE_DATA fields are None
    unless given: decide.py fills them from the data (on Fashion-MNIST: 28, 256, 8, 5,000, flip on)."""
    preset: str = DEFAULT_RECIPE  # the recipe the run started from
    # model
    arch: str = "1x32,2x64,2x128"
    ratio: int = 1
    input_size: int | None = None
    fc_width: int = 256
    dropout: float = 0.0
    batch_norm: bool = True
    init: str = "kaiming"
    # data
    data: str = "fashion-mnist"
    data_dir: str | None = None
    val_size: int | None = None
    normalize: bool = True
    crop_padding: int = 2
    flip: bool | None = None
    erasing: float = 0.0
    limit: int | None = None  # cap on training images (quick runs, tests)
    test_limit: int | None = None
    skip_bad: bool = False
    allow_sample: bool = True  # fall back to the bundled sample when the dataset can't be had
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.2  # fraction of steps rising to the peak lr (onecycle)
    label_smoothing: float = 0.1
    drop_last: bool = True
    # speed
    device: str = "auto"
    precision: str = "auto"  # auto|fp32|bf16|fp16
    channels_last: str = "auto"  # auto|on|off
    compile: str = "auto"  # auto|on|off
    allocator: str = "auto"  # auto|retain|default: CPU malloc, see allocator.py
    threads: int | None = None
    # run
    seed: int = 0
    out: str = "runs"
    name: str | None = None
    eval_every_epoch_on_test: bool = True

    def build_model(self, in_channels: int, num_classes: int):
        """The VGG this config describes, for data with these channels and classes."""
        from .model import VGG

        return VGG(self.arch, ratio=self.ratio, in_channels=in_channels, num_classes=num_classes,
                   input_size=self.input_size, fc_width=self.fc_width, dropout=self.dropout,
                   batch_norm=self.batch_norm, init=self.init)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# Left None, these are decided from the data when the run starts (decide.py); given (flag, TOML or
# recipe), they are taken as they are.
FROM_THE_DATA = ("input_size", "batch_size", "epochs", "val_size", "flip")

# A recipe: the fields it sets on top of TrainConfig's defaults.
RECIPES: dict[str, dict] = {
    DEFAULT_RECIPE: {},  # TrainConfig's defaults themselves
    # The textbook recipe exactly (Dive into Deep Learning, VGG section).
    "d2l": dict(arch="d2l-vgg11", ratio=4, input_size=224, fc_width=4096, dropout=0.5, batch_norm=False,
                init="xavier", normalize=False, val_size=0, crop_padding=0, flip=False, epochs=10,
                batch_size=128, lr=0.05, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0,
                schedule="none", label_smoothing=0.0, drop_last=False),
    # Wider VGG with batch norm, augmentation and a schedule, for the best accuracy.
    "best": dict(arch="2x64,2x128,3x256", input_size=28, fc_width=512, dropout=0.3, batch_norm=True,
                 init="kaiming", crop_padding=2, flip=True, erasing=0.25, epochs=40, batch_size=128, lr=0.05,
                 optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
                 label_smoothing=0.1),
}

CHOICES = {
    "optimizer": TRAINING_OPTIMIZERS,
    "schedule": tuple(SCHEDULES),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "channels_last": ("auto", "on", "off"),
    "compile": ("auto", "on", "off"),
    "allocator": ("auto", "retain", "default"),
    "init": ("xavier", "kaiming"),
}
FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def resolve_config(preset: str | None = None, file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """The recipe `preset`, then the TOML file's keys, then explicit overrides (None values are ignored)."""
    from_file = _read_toml(file) if file else {}
    preset = (overrides or {}).get("preset") or preset or from_file.get("preset") or DEFAULT_RECIPE
    if preset not in RECIPES:
        raise VggkitError(f"unknown preset {preset!r}; choose one of {', '.join(RECIPES)}")
    values = {**RECIPES[preset], **from_file, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    values["preset"] = preset
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise VggkitError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(FIELD_TYPES)}")
    config = TrainConfig(**values)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise VggkitError(f"{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    for key in ("lr", "epochs", "batch_size", "input_size", "ratio", "fc_width"):
        value = getattr(config, key)
        if value is None and key in FROM_THE_DATA:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            example = getattr(TrainConfig, key)
            fix = (f"e.g. --{key.replace('_', '-')} {example}" if example is not None
                   else "or leave it out to decide it from the data")
            raise VggkitError(f"{key} must be positive, got {value!r}; {fix}")
    for key in ("momentum", "weight_decay", "label_smoothing", "erasing", "dropout", "warmup"):
        value = getattr(config, key)
        if not isinstance(value, (int, float)) or not 0 <= value < (1 if key != "weight_decay" else float("inf")):
            raise VggkitError(f"{key} must be in [0, 1), got {value!r}")
    if config.val_size is not None and config.val_size < 0:
        raise VggkitError(f"val_size must be 0 or more, got {config.val_size}")


def _read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise VggkitError(f"config file {path} does not exist; check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise VggkitError(f"config file {path} is not valid TOML ({e})") from None
    return data.get("train", data)


def save_config(config: TrainConfig, path: Path) -> None:
    import tomli_w

    from .atomic import atomic_write_text

    atomic_write_text(path, tomli_w.dumps({"train": config.to_dict()}))


def load_config(path: Path) -> TrainConfig:
    values = _read_toml(path)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise VggkitError(f"{path} is not a vggkit run config ({e})") from None
