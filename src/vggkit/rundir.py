"""The run directory: the one place that knows its layout.

    runs/<name>/
        .vggkit-run                  the marker: this folder is a vggkit run (--overwrite replaces only those)
        .lock                        locked (flock) by the one process training here; holds its PID
        config.toml                  the resolved TrainConfig (a resumed run keeps it)
        metrics.csv, metrics.jsonl   one row per epoch; the event log (start, epoch, ..., end)
        curves.png                   loss and accuracy against epoch
        tensorboard/                 TensorBoard event files (--tensorboard)
        checkpoints/last/            model.safetensors + state.pt (optimizer, RNG, position)
        checkpoints/best/            model.safetensors of the best validation accuracy
        checkpoints/<name>/evaluation/   `vggkit evaluate`'s plots

A checkpoint directory is swapped in by renames (checkpoint.save_checkpoint): a run killed between
them leaves only `<name>.prev`, which every lookup here falls back to.

A new run is checked (RunDir.create: nothing written) before its data is loaded, and claimed
(RunDir.claim: locked, an old run cleared with --overwrite, the marker written) after. The lock is
the kernel's: it goes away with the process however it ends, so it is never stale. Reading a run
(evaluate, predict, export) takes no lock: every file in it is replaced whole.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch

from .atomic import atomic_write_text
from .config import TrainConfig, load_config, validate
from .errors import VggkitError
from .special_files import refuse_special

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

MARKER = ".vggkit-run"
LOCK = ".lock"
LOCK_ATTEMPTS = 5
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
    path = refuse_special(path, "weights")
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
        if refuse_special(directory / CONFIG, "run config").is_file():
            return directory / CONFIG
    return None


def export_dir(path: str | Path) -> Path:
    """Where an export of the checkpoint at `path` goes by default: its run directory (not the
    checkpoint directory, which the next save replaces whole), or beside weights outside a run."""
    checkpoint = find_checkpoint(path)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint


def evaluation_dir(path: str | Path, name: str | None = None) -> Path:
    """Where `vggkit evaluate` writes its plots for the checkpoint at `path`: evaluation/ for the
    test split, evaluation-<name>/ for another split or folder."""
    return find_checkpoint(path) / (EVALUATION if name is None else f"{EVALUATION}-{name}")


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def has_resumable_checkpoint(run_dir: str | Path) -> bool:
    return RunDir(run_dir).resumable_checkpoint() is not None


def check_run_name(name: str) -> None:
    """A run name is one plain folder name, so that the run directory is always inside --out."""
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if not name or name in (".", "..") or any(s in name for s in separators) or "\0" in name \
            or Path(name).is_absolute():
        raise VggkitError(f"--name {name!r} is not a plain name; give a folder name without "
                          f"{' or '.join(sorted(separators))} (not '.' or '..'): the run goes inside --out")


class RunInUse(VggkitError):
    """Another process trains in the run directory (it holds the run's lock)."""

    def __init__(self, path: Path, pid: int | None):
        who = f"process {pid}" if pid else "another process"
        stop = f" (kill {pid})" if pid else ""
        super().__init__(f"{path} is in use: {who} is training there; wait for it to end or stop it{stop}, "
                         "or use another --name")
        self.pid = pid


class RunLock:
    """An exclusive flock on the run's .lock file, which then holds the owner's PID."""

    def __init__(self, file=None):
        self._file = file

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        if fcntl is None:
            return cls()
        f = open(run_dir / LOCK, "a+")
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = _read_pid(f)
                if pid is not None or attempt == LOCK_ATTEMPTS - 1:  # no PID: maybe a holder() probe, gone at once
                    f.close()
                    raise RunInUse(run_dir, pid) from None
                time.sleep(0.05)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        return cls(f)

    @staticmethod
    def holder(run_dir: Path) -> int | None:
        """The PID of the process holding the run's lock (0 when it is unknown), None when it is free.
        Creates nothing."""
        if fcntl is None or not (run_dir / LOCK).is_file():
            return None
        with open(run_dir / LOCK) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(f) or 0
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _read_pid(f) -> int | None:
    f.seek(0)
    text = f.read().strip()
    return int(text) if text.isdigit() else None


class RunDir:
    """A run directory: create it, find its checkpoints, read its state and config, append events."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: RunLock | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, config: TrainConfig, overwrite: bool) -> RunDir:
        """A new run under config.out (named after the preset and time unless config.name is set),
        checked but not created yet (see claim): an existing run is refused unless `overwrite`,
        anything else that is there always, and so is a run another process trains in."""
        name = config.name if config.name is not None else f"{config.preset}-{datetime.now():%Y%m%d-%H%M%S}"
        check_run_name(name)
        run = cls(Path(config.out) / name)
        pid = RunLock.holder(run.path)
        if pid is not None:
            raise RunInUse(run.path, pid)
        run._check_replaceable(overwrite)
        return run

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        """A run to resume; refused when `path` is not a run directory."""
        run = cls(path)
        if not refuse_special(run.config_path, "run config").is_file():
            raise VggkitError(f"{run.path} is not a vggkit run (no {CONFIG}); give the run directory to resume")
        return run

    def claim(self, overwrite: bool) -> None:
        """Make the directory this process's run: lock it, check it again (another process may have
        started there since create), clear the old run with `overwrite`, write the marker."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        try:
            self._check_replaceable(overwrite)
            if overwrite:
                self._clear()
            atomic_write_text(self.path / MARKER, json.dumps({"created": datetime.now().isoformat(timespec="seconds"),
                                                              "pid": os.getpid()}) + "\n")
        except BaseException:
            self.unlock()
            raise

    def lock(self) -> None:
        """Hold the run's lock until unlock() or the end of the process; RunInUse if another holds it."""
        if self._lock is None:
            self._lock = RunLock.acquire(self.path)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def is_run(self) -> bool:
        """Whether the directory is a vggkit run: its marker, or (runs made before the marker) a
        config.toml that reads as a vggkit config beside a checkpoints/ folder."""
        if (self.path / MARKER).is_file():
            return True
        if not (self.config_path.is_file() and (self.path / CHECKPOINTS).is_dir()):
            return False
        try:
            load_config(self.config_path)
        except (VggkitError, OSError):
            return False
        return True

    def _holds_files(self) -> bool:
        if self.path.exists() and not self.path.is_dir():
            raise VggkitError(f"{self.path} is a file, not a run directory; choose another --name or --out")
        return self.path.is_dir() and any(entry.name != LOCK for entry in self.path.iterdir())

    def _check_replaceable(self, overwrite: bool) -> None:
        """Refuse an existing non-empty directory, unless it is a run and `overwrite` is given."""
        if not self._holds_files():
            return
        if not self.is_run():
            raise VggkitError(f"{self.path} already exists and is not a vggkit run (no {MARKER}); vggkit replaces "
                              "only its own runs: choose another --name or --out")
        if overwrite:
            return
        if self.resumable_checkpoint() is None:
            raise VggkitError(f"{self.path} holds a run that saved no checkpoint; use --overwrite to replace it, "
                              "or another --name")
        raise VggkitError(f"{self.path} already holds a run; use --resume {self.path} to continue it, "
                          "--overwrite to replace it, or another --name")

    def _clear(self) -> None:
        """Remove the old run's files: only what is inside the directory (a link is removed, not followed)."""
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

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
            if refuse_special(directory / STATE, "training state").is_file():
                return directory
        return None

    def last_checkpoint(self) -> Path:
        directory = self.resumable_checkpoint()
        if directory is None:
            raise VggkitError(f"{self.path} has no checkpoint to resume from ({CHECKPOINTS}/{LAST} is missing); "
                              "start it again with --overwrite (same --out and --name), or start a new run")
        return directory

    def read_state(self) -> dict:
        """The training state of the last checkpoint (optimizer, RNG, epoch, step, ...)."""
        path = refuse_special(self.last_checkpoint() / STATE, "training state")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say so in one line
            raise VggkitError(f"cannot read training state {path} ({type(e).__name__}); "
                              "the checkpoint is damaged: start a new run or restore the file") from None

    def read_weights(self) -> dict:
        """The model weights of the last checkpoint, as a state dict."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = refuse_special(self.last_checkpoint() / WEIGHTS, "weights")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise VggkitError(f"cannot read weights {path} ({e}); the checkpoint is damaged") from None

    def resumed_config(self, overrides: TrainConfig | dict | None) -> TrainConfig:
        """The run's saved config with `overrides` applied: only RESUMABLE keys may change; None
        values and "preset" are ignored; a value equal to the saved one is accepted. The result is
        validated as a new run's config is (config.validate)."""
        config = load_config(self.config_path)
        overrides = overrides.to_dict() if isinstance(overrides, TrainConfig) else dict(overrides or {})
        for key, value in overrides.items():
            if value is None or key == "preset":
                continue
            if key not in RESUMABLE and getattr(config, key, value) != value:
                raise VggkitError(f"a resumed run keeps its config ({self.config_path}); drop the {key} option "
                                  f"(only {', '.join(sorted(RESUMABLE))} may change)")
            setattr(config, key, value)
        validate(config)
        return config
