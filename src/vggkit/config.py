"""Training configuration: a recipe (RECIPES, picked by the `preset` key or --preset), overridden by a
TOML file and then by flags; saved with the run. Architecture presets (vgg11, ...) are specs.PRESETS."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .balance import BALANCE_CHOICES
from .cost import PRECISION_DTYPES
from .errors import VggkitError
from .optim import SCHEDULES, TRAINING_OPTIMIZERS
from .special_files import refuse_special
from .specs import parse_arch
from .tta import TTA_LEVELS


DEFAULT_RECIPE = "fast"


@dataclass
class TrainConfig:
    """Every field of a training run. The defaults are the `fast` recipe: small VGG blocks, bf16 +
    channels-last on CPU, one-cycle SGD, crop, label smoothing. The FROM_THE_DATA fields are None
    unless given: decide.py fills them from the data (on Fashion-MNIST: 28, 256, 12, 5,000, flip on,
    flip TTA)."""
    preset: str = DEFAULT_RECIPE  # the recipe the run started from
    # model (arch, ratio, fc_width, batch_norm: None when they come from the initial weights)
    arch: str | None = "1x32,2x64,2x128"
    ratio: int | None = 1
    input_size: int | None = None
    fc_width: int | None = 256
    dropout: float = 0.0
    batch_norm: bool | None = True
    init: str = "kaiming"  # the weight-initialisation scheme (--init-scheme); `init_from` names initial weights
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
    streaming: str = "auto"  # auto|on|off: an image folder's images stay on disk, prepared once (photos: auto)
    workers: int | None = None  # processes decoding and augmenting streamed images; None: decided (stream.py)
    allow_sample: bool = True  # fall back to the bundled sample when the dataset can't be had
    balance: str = "auto"  # imbalanced classes (balance.py): auto|weights|sampling|off; a run saves what auto decided
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # from the data: 0.1 at batch 256, x (batch / 256) ** 0.25 (decide.py)
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.2  # fraction of steps rising to the peak lr (onecycle)
    label_smoothing: float = 0.1
    drop_last: bool = True
    ema: float = 0.0  # weight averaging (ema.py): the decay, 0 = off; evaluation and checkpoints use the average
    ema_every: int = 1  # steps between EMA updates
    # speed
    device: str = "auto"
    precision: str = "auto"  # auto|fp32|bf16|fp16
    channels_last: str = "auto"  # auto|on|off
    compile: str = "auto"  # auto|on|off
    allocator: str = "auto"  # auto|retain|default: CPU malloc, see allocator.py
    threads: int | None = None
    kernels: str = "fast"  # fast|plain: vggkit's CPU kernels where they apply (kernels.routing) or the plain network; "auto" = fast
    # run
    seed: int = 0
    out: str = "runs"
    name: str | None = None
    eval_every_epoch_on_test: bool = True
    tta: str | None = None  # test-time augmentation (tta.TTA_LEVELS) beside the final test figure; never picks a checkpoint
    # fine-tuning (pretrained.py) and TensorBoard
    init_from: str | None = None  # initial weights (--init): a run, checkpoint, .pth/.safetensors file or vgg16...
    freeze: int | str = 0  # blocks kept as they are, from the first: a number or "features" (all)
    head_pool: str | None = None  # none|adaptive; None: decided (adaptive for photos, or where the initial weights need it)
    backbone_lr: float | None = None  # the feature blocks' learning rate, a fraction of lr; None: 0.1 with --init, else 1
    tensorboard: bool = False  # event files under RUN/tensorboard/ (pip install 'vggkit[tensorboard]')

    def build_model(self, in_channels: int, num_classes: int):
        """The VGG this config describes, for data with these channels and classes."""
        from .model import VGG

        return VGG(**self.model_arguments(in_channels, num_classes))

    def model_arguments(self, in_channels: int, num_classes: int) -> dict:
        """VGG's keyword arguments for build_model (bounds.py costs them before anything is built)."""
        return dict(arch=self.arch, ratio=self.ratio, in_channels=in_channels, num_classes=num_classes,
                    input_size=self.input_size, fc_width=self.fc_width, dropout=self.dropout,
                    batch_norm=self.batch_norm, init=self.init, head_pool=self.head_pool or "none")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# Left None, these are decided from the data when the run starts (decide.py); given (flag, TOML or
# recipe), they are taken as they are.
FROM_THE_DATA = ("input_size", "batch_size", "epochs", "val_size", "flip", "lr", "tta")

# A recipe: the fields it sets on top of TrainConfig's defaults.
RECIPES: dict[str, dict] = {
    DEFAULT_RECIPE: {},  # TrainConfig's defaults themselves
    # The textbook recipe exactly (Dive into Deep Learning, VGG section).
    "d2l": dict(arch="d2l-vgg11", ratio=4, input_size=224, fc_width=4096, dropout=0.5, batch_norm=False,
                init="xavier", normalize=False, val_size=0, crop_padding=0, flip=False, epochs=10,
                batch_size=128, lr=0.05, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0,
                schedule="none", label_smoothing=0.0, drop_last=False, tta="off", balance="off"),
    # Wider VGG with batch norm, augmentation and a schedule, for the best accuracy.
    "best": dict(arch="2x64,2x128,3x256", input_size=28, fc_width=512, dropout=0.3, batch_norm=True,
                 init="kaiming", crop_padding=2, flip=True, erasing=0.25, epochs=40, batch_size=128, lr=0.05,
                 optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
                 label_smoothing=0.1, tta="flip"),
}


CHOICES = {
    "optimizer": TRAINING_OPTIMIZERS,
    "schedule": tuple(SCHEDULES),
    "precision": ("auto", *PRECISION_DTYPES),
    "channels_last": ("auto", "on", "off"),
    "compile": ("auto", "on", "off"),
    "allocator": ("auto", "retain", "default"),
    "init": ("xavier", "kaiming"),
    "kernels": ("fast", "plain", "auto"),  # "auto": the old spelling of "fast"
    "tta": tuple(TTA_LEVELS),
    "streaming": ("auto", "on", "off"),
    "balance": BALANCE_CHOICES,
}
FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
# With initial weights, these come from the weights unless given by a flag or the file (a recipe's don't count).
FROM_WEIGHTS = ("arch", "ratio", "fc_width", "batch_norm")


def resolve_config(preset: str | None = None, file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """The recipe `preset`, then the TOML file's keys, then explicit overrides (None values are ignored)."""
    from_file = _read_toml(file) if file else {}
    _check_file_types(file, from_file)
    preset = (overrides or {}).get("preset") or preset or from_file.get("preset") or DEFAULT_RECIPE
    _check_preset(preset)
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
    check_sizes(config)
    return config


def _check_file_types(file, from_file: dict) -> None:
    """Every value of the file of its field's type, even where a flag overrides it: a file that says
    `epochs = true` is wrong whatever the command line gives."""
    for key, value in from_file.items():
        if key == "preset":
            _check_preset(value)
        elif key in FIELD_TYPES:
            try:
                _check_type(key, value, FIELD_TYPES[key])
            except VggkitError as e:
                raise VggkitError(f"config file {file}: {e}") from None


def check_sizes(config: TrainConfig) -> None:
    """The architecture and input size of a new run against what the machine can hold (bounds.py),
    before any data is loaded: one image of the smallest input the blocks take must fit."""
    from .bounds import check_arch_input

    if config.arch is not None:
        check_arch_input(len(parse_arch(config.arch, config.ratio or 1)), config.input_size)
    elif config.input_size is not None:
        check_arch_input(0, config.input_size)


# Ranges, field by field (types come from TrainConfig's annotations; every float must be finite).
POSITIVE = ("epochs", "batch_size", "input_size", "ratio", "fc_width", "lr", "limit", "test_limit", "threads",
            "ema_every", "backbone_lr")
AT_LEAST_ZERO = ("val_size", "crop_padding", "weight_decay", "workers")
FRACTIONS = ("momentum", "label_smoothing", "erasing", "dropout", "warmup", "ema")  # in [0, 1)
MAX_THREADS = 1024  # torch starts that many threads at once: beyond this, a typo
SEED_RANGE = (0, 2**64 - 1)  # what torch.manual_seed takes
# Examples for the messages where TrainConfig's default is None (or, for ema, off).
EXAMPLES = {"data_dir": "data/fashion-mnist", "val_size": 5000, "limit": 1000, "test_limit": 1000, "threads": 4,
            "name": "my-run", "lr": 0.1, "input_size": 28, "batch_size": 256, "epochs": 8, "flip": True,
            "ema": 0.999, "ema_every": 4, "tta": "flip", "workers": 2, "backbone_lr": 0.1, "head_pool": "adaptive"}
LEFT_OUT = {"threads": "torch's default, one per core", "limit": "every image", "test_limit": "every image",
            "workers": "decided: one per core to decode, none for batches on a CPU",
            **{key: "decided from the data" for key in FROM_THE_DATA}}
TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def validate(config: TrainConfig) -> None:
    """Check every field: its declared type (bool is not int, numbers are finite), its range or
    choices, and the architecture. A VggkitError names the field and a valid value. Used for new,
    file-read and resumed configs alike."""
    for f in fields(TrainConfig):
        _check_type(f.name, getattr(config, f.name), f.type)
    _check_preset(config.preset)
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed and not (key in FROM_THE_DATA and getattr(config, key) is None):
            raise VggkitError(f"{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    _check_ranges(config)
    if config.arch is not None:  # None: from the initial weights
        parse_arch(config.arch, config.ratio or 1)  # a typo in the blocks is said before any data is loaded
    validate_fine_tuning(config)


def _check_preset(preset) -> None:
    if not isinstance(preset, str) or preset not in RECIPES:
        raise VggkitError(f"unknown preset {preset!r}; choose one of {', '.join(RECIPES)}")


def _check_type(name: str, value, declared: str) -> None:
    kind, *others = declared.split(" | ")
    if value is None:
        if "None" in others:
            return
        raise VggkitError(f"{name} must be {TYPE_NAMES[kind]}; e.g. {_example(name)}")
    kinds = [kind, *(k for k in others if k != "None")]  # e.g. freeze: int | str
    checks = {"bool": isinstance(value, bool), "str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}
    if not any(checks[k] for k in kinds):
        raise VggkitError(f"{name} must be {TYPE_NAMES[kind]}, got {_toml(value)} ({type(value).__name__}); "
                          f"e.g. {_example(name)}")
    if kind == "float" and not math.isfinite(value):
        raise VggkitError(f"{name} must be a finite number, got {value}; e.g. {_example(name)}")


def _check_ranges(config: TrainConfig) -> None:
    for key in POSITIVE:
        value = getattr(config, key)
        if value is not None and not value > 0:
            raise VggkitError(f"{key} must be positive, got {value!r}; e.g. {_flag_example(key)}"
                              + (f" (or leave it out: {LEFT_OUT[key]})" if key in LEFT_OUT else ""))
    for key in AT_LEAST_ZERO:
        value = getattr(config, key)
        if value is not None and value < 0:
            raise VggkitError(f"{key} must be 0 or more, got {value!r}; e.g. {_flag_example(key)}")
    for key in FRACTIONS:
        value = getattr(config, key)
        if not 0 <= value < 1:
            raise VggkitError(f"{key} must be in [0, 1), got {value!r}; e.g. {_flag_example(key)}")
    if config.threads is not None and config.threads > MAX_THREADS:
        raise VggkitError(f"threads must be at most {MAX_THREADS}, got {config.threads} "
                          f"(or leave it out: {LEFT_OUT['threads']})")
    low, high = SEED_RANGE
    if not low <= config.seed <= high:
        raise VggkitError(f"seed must be in [{low}, 2**64 - 1] (torch's range), got {config.seed}; "
                          f"e.g. {_flag_example('seed')}")


def _example(name: str) -> str:
    """A valid setting of `name` as a TOML line: where wrong types come from."""
    return f"{name} = {_toml(_example_value(name))}"


def _flag_example(name: str) -> str:
    return f"--{name.replace('_', '-')} {_example_value(name)}"


def _example_value(name: str):
    return EXAMPLES.get(name, getattr(TrainConfig, name, None))


def _toml(value) -> str:
    """A value as TOML writes it (strings quoted, booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def require_tensorboard() -> None:
    """A one-line error when the optional tensorboard package is missing (called before a run writes)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise VggkitError("--tensorboard needs the tensorboard package: pip install 'vggkit[tensorboard]' "
                          "(or train without --tensorboard)")


def validate_fine_tuning(config: TrainConfig) -> None:
    """init_from, freeze, head_pool and tensorboard (its package must be installed: checked before a run writes)."""
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
    """The table of config keys in a TOML file ([train], or the top level)."""
    from .bounds import read_capped

    path = refuse_special(path, "config file")
    try:
        data = tomllib.loads(read_capped(path, what="config file").decode("utf-8"))
    except FileNotFoundError:
        raise VggkitError(f"config file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise VggkitError(f"config file {path} is a folder; give a TOML file") from None
    except UnicodeDecodeError as e:
        raise VggkitError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise VggkitError(f"config file {path} is not valid TOML ({e})") from None
    except RecursionError:
        raise VggkitError(f"config file {path} nests arrays or tables too deeply to read; a vggkit config is "
                          "key = value lines") from None
    table = data.get("train", data)
    if not isinstance(table, dict):
        raise VggkitError(f"config file {path}: train must be a table ([train] followed by key = value lines)")
    return table


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """config with its paths absolute (data when it is an image folder, data_dir, init_from when it names a
    file or folder), so that a run's saved config names the same files from any working directory. Runs
    saved with relative paths still work from the directory they were started in."""
    from .data.load import is_folder

    def absolute(path: str) -> str:  # symbolic links kept: the names the user gave
        return os.path.abspath(os.path.expanduser(path))

    changes = {}
    if is_folder(config.data):
        changes["data"] = absolute(config.data)
    if config.data_dir is not None:
        changes["data_dir"] = absolute(config.data_dir)
    if config.init_from is not None and Path(config.init_from).expanduser().exists():
        changes["init_from"] = absolute(config.init_from)
    return dataclasses.replace(config, **changes)


def save_config(config: TrainConfig, path: Path) -> None:
    import tomli_w

    from .atomic import atomic_write_text

    atomic_write_text(path, tomli_w.dumps({"train": config.to_dict()}))


# Keys that runs saved before they existed lack: their defaults are what those runs did (no averaging, no TTA).
ADDED_LATER = {"ema": TrainConfig.ema, "ema_every": TrainConfig.ema_every, "tta": "off", "streaming": "off",
               "balance": "off"}


def load_config(path: Path) -> TrainConfig:
    """A run's saved config.toml: every key that save_config writes, each valid."""
    values = {**ADDED_LATER, **_read_toml(path)}
    unknown = sorted(set(values) - set(FIELD_TYPES))
    # a saved run has every field that is never None, and those filled in from the weights and the data
    required = [f.name for f in fields(TrainConfig) if "None" not in f.type or f.name in FROM_WEIGHTS + FROM_THE_DATA]
    missing = [key for key in required if key not in values]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r} key"
        raise VggkitError(f"{path} is not a vggkit run config ({what}); restore the file or start a new run")
    config = TrainConfig(**values)
    try:
        validate(config)
    except VggkitError as e:
        raise VggkitError(f"{path} is damaged: {e}; fix the file or start a new run") from None
    return config
