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
    """Every field of a training run. The defaults are the `fast` recipe: VGG blocks for native 28x28
    input, bf16 + channels-last on CPU, one-cycle SGD, flip/crop, label smoothing."""
    preset: str = DEFAULT_RECIPE  # the recipe the run started from
    # model (arch, ratio, fc_width, batch_norm: None when they come from the initial weights)
    arch: str | None = "1x32,2x64,2x128"
    ratio: int | None = 1
    input_size: int = 28
    fc_width: int | None = 256
    dropout: float = 0.0
    batch_norm: bool | None = True
    init: str = "kaiming"  # the weight-initialisation scheme (--init-scheme); `init_from` names initial weights
    # data
    data: str = "fashion-mnist"
    data_dir: str | None = None
    val_size: int | None = None  # None: the dataset's default (5,000 for Fashion-MNIST)
    normalize: bool = True
    crop_padding: int = 2
    flip: bool = True
    erasing: float = 0.0
    limit: int | None = None  # cap on training images (quick runs, tests)
    test_limit: int | None = None
    skip_bad: bool = False
    allow_sample: bool = True  # fall back to the bundled sample when the dataset can't be had
    # optimisation
    epochs: int = 8
    batch_size: int = 256
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
    # fine-tuning (pretrained.py) and TensorBoard
    init_from: str | None = None  # initial weights (--init): a run, checkpoint, .pth/.safetensors file or vgg16...
    freeze: int | str = 0  # blocks kept as they are, from the first: a number or "features" (all)
    head_pool: str | None = None  # none|adaptive; None: none, or adaptive when the initial weights need it
    tensorboard: bool = False  # event files under RUN/tensorboard/ (pip install 'vggkit[tensorboard]')

    def build_model(self, in_channels: int, num_classes: int):
        """The VGG this config describes, for data with these channels and classes."""
        from .model import VGG

        return VGG(self.arch, ratio=self.ratio, in_channels=in_channels, num_classes=num_classes,
                   input_size=self.input_size, fc_width=self.fc_width, dropout=self.dropout,
                   batch_norm=self.batch_norm, init=self.init, head_pool=self.head_pool or "none")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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
# With initial weights, these come from the weights unless given by a flag or the file (a recipe's don't count).
FROM_WEIGHTS = ("arch", "ratio", "fc_width", "batch_norm")


def resolve_config(preset: str | None = None, file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """The recipe `preset`, then the TOML file's keys, then explicit overrides (None values are ignored)."""
    from_file = _read_toml(file) if file else {}
    preset = (overrides or {}).get("preset") or preset or from_file.get("preset") or DEFAULT_RECIPE
    if preset not in RECIPES:
        raise VggkitError(f"unknown preset {preset!r}; choose one of {', '.join(RECIPES)}")
    given = {**from_file, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    values = {**RECIPES[preset], **given}
    if values.get("init_from"):
        values.update({key: None for key in FROM_WEIGHTS if key not in given})
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
        if value is None and key in FROM_WEIGHTS and config.init_from:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise VggkitError(f"{key} must be positive, got {value!r}; e.g. --{key.replace('_', '-')} "
                              f"{getattr(TrainConfig, key)}")
    for key in ("momentum", "weight_decay", "label_smoothing", "erasing", "dropout", "warmup"):
        value = getattr(config, key)
        if not isinstance(value, (int, float)) or not 0 <= value < (1 if key != "weight_decay" else float("inf")):
            raise VggkitError(f"{key} must be in [0, 1), got {value!r}")
    if config.val_size is not None and config.val_size < 0:
        raise VggkitError(f"val_size must be 0 or more, got {config.val_size}")
    validate_fine_tuning(config)


def validate_fine_tuning(config: TrainConfig) -> None:
    """init_from, freeze, head_pool and tensorboard (its package must be installed: checked before a run writes)."""
    from .loggers import require_tensorboard
    from .model import HEAD_POOLS

    if config.init_from is not None and (not isinstance(config.init_from, str) or not config.init_from.strip()):
        raise VggkitError(f"init_from must name initial weights (a run, a weights file or e.g. vgg16), "
                          f"got {config.init_from!r}")
    if config.init_from in CHOICES["init"] and not Path(config.init_from).exists():  # the flag's old meaning
        raise VggkitError(f"--init names initial weights; for the weight-initialisation scheme use "
                          f"--init-scheme {config.init_from} (TOML key: init)")
    freeze = config.freeze
    if freeze != "features" and (not isinstance(freeze, int) or isinstance(freeze, bool) or freeze < 0):
        raise VggkitError(f"freeze takes a number of blocks (0 or more) or 'features', got {freeze!r}")
    if config.head_pool is not None and config.head_pool not in HEAD_POOLS:
        raise VggkitError(f"head_pool must be one of {', '.join(HEAD_POOLS)}, got {config.head_pool!r}")
    if config.tensorboard:
        require_tensorboard()


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
