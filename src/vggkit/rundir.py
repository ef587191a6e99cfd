"""The run directory: the one place that knows its layout.

    runs/<name>/
        config.toml                  the resolved TrainConfig (a resumed run keeps it)
        metrics.csv, metrics.jsonl   one row per epoch; the event log (start, epoch, ..., end)
        curves.png                   loss and accuracy against epoch
        tensorboard/                 TensorBoard event files (--tensorboard)
        checkpoints/last/            model.safetensors + state.pt (optimizer, RNG, position)
        checkpoints/best/            model.safetensors of the best validation accuracy
        checkpoints/<name>/evaluation/   `vggkit evaluate`'s plots

A checkpoint directory is swapped in by renames (checkpoint.save_checkpoint): a run killed between
them leaves only `<name>.prev`, which every lookup here falls back to.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import torch

from .config import TrainConfig, load_config
from .errors import VggkitError

CONFIG = "config.toml"
METRICS_CSV = "metrics.csv"
EVENTS = "metrics.jsonl"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LAST, BEST = "last", "best"
EVALUATION = "evaluation"
# inside a checkpoint directory
WEIGHTS = "model.safetensors"
STATE = "state.pt"
PREV_SUFFIX = ".prev"

RESUMABLE = {"epochs", "device", "threads"}  # the config keys a resumed run may change


def previous(directory: Path) -> Path:
    """Where save_checkpoint keeps the old copy of `directory` while it swaps the new one in."""
    return directory.with_name(directory.name + PREV_SUFFIX)


def _with_fallback(directory: Path) -> tuple[Path, Path]:
    return directory, previous(directory)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for a run dir (best, else last), a checkpoint dir, or a weights file."""
    path = Path(path)
    if path.is_file():
        return path.parent
    for candidate in (path / CHECKPOINTS / BEST, path / CHECKPOINTS / LAST, path):
        for directory in _with_fallback(candidate):
            if (directory / WEIGHTS).is_file():
                return directory
    raise VggkitError(f"no weights found at {path}: give a run directory, a checkpoint directory or a {WEIGHTS} file")


def weights_file(path: str | Path) -> Path:
    """The weights file for a run dir, a checkpoint dir or the file itself."""
    path = Path(path)
    return path if path.is_file() else find_checkpoint(path) / WEIGHTS


def find_config(path: str | Path) -> Path | None:
    """The config of the run that the checkpoint at `path` belongs to; None for weights that stand alone."""
    checkpoint = find_checkpoint(path)
    for directory in (checkpoint.parent.parent, checkpoint.parent, checkpoint):
        if (directory / CONFIG).is_file():
            return directory / CONFIG
    return None


def export_dir(path: str | Path) -> Path:
    """Where an export of the checkpoint at `path` goes by default: its run directory (not the
    checkpoint directory, which the next save replaces whole), or beside weights outside a run."""
    checkpoint = find_checkpoint(path)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint


def evaluation_dir(path: str | Path) -> Path:
    """Where `vggkit evaluate` writes its plots for the checkpoint at `path`."""
    return find_checkpoint(path) / EVALUATION


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def has_resumable_checkpoint(run_dir: str | Path) -> bool:
    return RunDir(run_dir).resumable_checkpoint() is not None


class RunDir:
    """A run directory: create it, find its checkpoints, read its state and config, append events."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, config: TrainConfig, overwrite: bool) -> RunDir:
        """A new run under config.out (named after the preset and time unless config.name is set).
        An existing non-empty directory is refused, or removed with `overwrite`; nothing is created yet."""
        name = config.name or f"{config.preset}-{datetime.now():%Y%m%d-%H%M%S}"
        run = cls(Path(config.out) / name)
        if run.path.exists() and any(run.path.iterdir()):
            if not overwrite:
                raise VggkitError(f"{run.path} already holds a run; use --resume {run.path} to continue it, "
                                  "--overwrite to replace it, or another --name")
            shutil.rmtree(run.path)
        return run

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        """A run to resume; refused when `path` is not a run directory."""
        run = cls(path)
        if not run.config_path.is_file():
            raise VggkitError(f"{run.path} is not a vggkit run (no {CONFIG}); give the run directory to resume")
        return run

    # ------------------------------------------------------------------------------ files

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def events_path(self) -> Path:
        return self.path / EVENTS

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def last(self) -> Path:
        """The directory of the checkpoint written at every epoch end and on interruption."""
        return self.path / CHECKPOINTS / LAST

    @property
    def best(self) -> Path:
        """The directory of the checkpoint with the best validation (or training) accuracy."""
        return self.path / CHECKPOINTS / BEST

    # ------------------------------------------------------------------------------ the event log

    def log_event(self, record: dict) -> None:
        with open(self.events_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_events(self) -> list[dict]:
        if not self.events_path.is_file():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------------------ resuming

    def resumable_checkpoint(self) -> Path | None:
        """checkpoints/last, or its .prev copy when a kill fell between save_checkpoint's renames."""
        for directory in _with_fallback(self.last):
            if (directory / STATE).is_file():
                return directory
        return None

    def last_checkpoint(self) -> Path:
        directory = self.resumable_checkpoint()
        if directory is None:
            raise VggkitError(f"{self.path} has no checkpoint to resume from ({CHECKPOINTS}/{LAST} is missing); "
                              "start a new run")
        return directory

    def read_state(self) -> dict:
        """The training state of the last checkpoint (optimizer, RNG, epoch, step, ...)."""
        path = self.last_checkpoint() / STATE
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say so in one line
            raise VggkitError(f"cannot read training state {path} ({type(e).__name__}); "
                              "the checkpoint is damaged: start a new run or restore the file") from None

    def read_weights(self) -> dict:
        """The model weights of the last checkpoint, as a state dict."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.last_checkpoint() / WEIGHTS
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise VggkitError(f"cannot read weights {path} ({e}); the checkpoint is damaged") from None

    def resumed_config(self, overrides: TrainConfig | dict | None) -> TrainConfig:
        """The run's saved config with `overrides` applied: only RESUMABLE keys may change; None
        values and "preset" are ignored; a value equal to the saved one is accepted."""
        config = load_config(self.config_path)
        overrides = overrides.to_dict() if isinstance(overrides, TrainConfig) else dict(overrides or {})
        for key, value in overrides.items():
            if value is None or key == "preset":
                continue
            if key not in RESUMABLE and getattr(config, key, value) != value:
                raise VggkitError(f"a resumed run keeps its config ({self.config_path}); drop the {key} option "
                                  f"(only {', '.join(sorted(RESUMABLE))} may change)")
            setattr(config, key, value)
        return config
