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
        model.onnx, model.pt         `vggkit export`'s default outputs

A checkpoint directory is swapped in by renames (checkpoint.save_checkpoint): a run killed between
them leaves only `<name>.prev`, which every lookup here falls back to.

Nothing in a run is followed through a symbolic link (vggkit makes none) or written in place of a
device or FIFO (atomic.py). --overwrite deletes only what is vggkit's own (LAYOUT: the files above
and their temporaries); anything else in the run stops it, named in the error. A run that predates
the marker is recognised by a vggkit config.toml together with vggkit weights in its checkpoints/.

A new run is checked (RunDir.create: nothing written) before its data is loaded, and claimed
(RunDir.claim: locked, an old run cleared with --overwrite, the marker written) after. The lock is
the kernel's: it goes away with the process however it ends, so it is never stale. Reading a run
(evaluate, predict, export) takes no lock: every file in it is replaced whole.
"""
from __future__ import annotations

import json
import os
import stat
import time
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from .atomic import atomic_write_text, kind_of, make_folder, open_own
from .config import TrainConfig, load_config, validate
from .errors import VggkitError
from .metrics import EVALUATION_FILES
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
EXPORTS = {"onnx": "model.onnx", "torchscript": "model.pt"}  # `vggkit export`'s file in the run, by format
EVALUATION_PLOTS = ("confusion.png", "misclassified.png", "misclassified_gradcam.png")
TENSORBOARD_FILES = "events.out.tfevents.*"
SAFETENSORS_TEMPORARY = ".tmp*"  # safetensors writes the weights beside their name, then renames

# What vggkit writes in a run, folder by folder: name patterns (fnmatch) of its files, and of its
# folders with the layout of each. A file's atomic_write temporary (.NAME.*.tmp) is vggkit's too.
_EVALUATION = {"files": EVALUATION_PLOTS + EVALUATION_FILES}
_CHECKPOINT = {"files": (WEIGHTS, STATE, SAFETENSORS_TEMPORARY),
               "folders": {EVALUATION: _EVALUATION, f"{EVALUATION}-*": _EVALUATION}}
LAYOUT = {
    "files": (MARKER, LOCK, CONFIG, METRICS_CSV, EVENTS, CURVES, *EXPORTS.values()),
    "folders": {
        TENSORBOARD: {"files": (TENSORBOARD_FILES,)},
        CHECKPOINTS: {"folders": {pattern: _CHECKPOINT for name in (LAST, BEST)
                                  for pattern in (name, name + PREV_SUFFIX, f".{name}.*.tmp")}},
    },
}
LISTED = 5  # entries named in an error about what a run holds

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
    return find_checkpoint(path) / evaluation_folder(name)


def evaluation_folder(name: str | None = None) -> str:
    """The name of `vggkit evaluate`'s folder in a checkpoint: evaluation, or evaluation-<name>."""
    return EVALUATION if name is None else f"{EVALUATION}-{name}"


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


def _is_file(path: Path) -> bool:
    """Whether `path` is a regular file itself (not through a link)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _sort_entries(folder: Path, layout: dict, own: list[Path], others: list[tuple[Path, str | None]]) -> None:
    """Sort what `folder` holds into vggkit's own (by `layout`, see LAYOUT) and the others (RunDir.inventory)."""
    folders, files = layout.get("folders", {}), layout.get("files", ())
    for entry in sorted(folder.iterdir()):
        mode = os.lstat(entry).st_mode
        folder_layout = next((sub for pattern, sub in folders.items() if fnmatchcase(entry.name, pattern)), None)
        file_name = any(fnmatchcase(entry.name, p) or fnmatchcase(entry.name, f".{p}.*.tmp") for p in files)
        if stat.S_ISDIR(mode) and folder_layout is not None:
            _sort_entries(entry, folder_layout, own, others)
            own.append(entry)
        elif stat.S_ISREG(mode) and file_name:
            own.append(entry)
        else:
            others.append((entry, kind_of(mode) if folder_layout is not None or file_name else None))


def _listed(run: Path, entries: list[Path], kinds: bool = False) -> str:
    """Entries of a run for a one-line message: relative, folders ending in /, what each is where it
    is neither a file nor a folder (or with `kinds`), the first LISTED."""
    def name(entry: Path) -> str:
        mode = os.lstat(entry).st_mode
        text = str(entry.relative_to(run)) + ("/" if stat.S_ISDIR(mode) else "")
        plain = stat.S_ISDIR(mode) or stat.S_ISREG(mode)
        return f"{text} (a {kind_of(mode)})" if kinds or not plain else text

    shown = ", ".join(name(e) for e in entries[:LISTED])
    more = f" and {len(entries) - LISTED} more" if len(entries) > LISTED else ""
    return f"{shown}{more}"


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
        f = open_own(run_dir / LOCK, "a+", truncates=True)
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
        Creates nothing; NotAFile where the lock is a link, a FIFO or a device."""
        if fcntl is None:
            return None
        f = open_own(run_dir / LOCK, "r")
        if f is None:
            return None
        with f:
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
        if run.path.is_symlink():
            raise VggkitError(f"{run.path} is a symbolic link; vggkit does not follow a link to a run (it would write, "
                              "and with --overwrite delete, where the link points): choose another --name")
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
        planted = [entry for entry, kind in run.inventory()[1] if kind is not None]
        if planted:
            it = "it" if len(planted) == 1 else "them"
            raise VggkitError(f"{run.path} holds {_listed(run.path, planted, kinds=True)} where vggkit writes its own "
                              f"files; vggkit never follows or replaces what it did not create: remove {it}")
        return run

    def claim(self, overwrite: bool) -> None:
        """Make the directory this process's run: lock it, check it again (another process may have
        started there since create), clear the old run with `overwrite`, write the marker."""
        make_folder(self.path)
        self.lock()
        try:
            self._clear(self._check_replaceable(overwrite))
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
        config.toml that reads as a vggkit config together with weights that vggkit wrote in
        checkpoints/ (a copied config.toml alone is not a run)."""
        if _is_file(self.path / MARKER):
            return True
        if not _is_file(self.config_path) or not self._has_vggkit_weights():
            return False
        try:
            load_config(self.config_path)
        except (VggkitError, OSError):
            return False
        return True

    def _has_vggkit_weights(self) -> bool:
        """Whether a checkpoint of the run holds weights with vggkit's metadata (a header read)."""
        from safetensors import SafetensorError, safe_open

        for directory in (*_with_fallback(self.last), *_with_fallback(self.best)):
            if _is_file(directory / WEIGHTS):
                try:
                    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
                        if "vggkit" in (f.metadata() or {}):
                            return True
                except (SafetensorError, OSError, ValueError):  # not a safetensors file: not vggkit's weights
                    continue
        return False

    def inventory(self) -> tuple[list[Path], list[tuple[Path, str | None]]]:
        """(vggkit's own entries in the run, files before the folder holding them; the others, each
        with None for a name vggkit does not write, or what it is, e.g. "symbolic link", where
        something not vggkit's has the name of a file or folder vggkit writes). Follows no link."""
        own: list[Path] = []
        others: list[tuple[Path, str | None]] = []
        _sort_entries(self.path, LAYOUT, own, others)
        return own, others

    def _holds_files(self) -> bool:
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            what = kind_of(os.lstat(self.path).st_mode)
            raise VggkitError(f"{self.path} is a {what}, not a run directory; choose another --name or --out")
        return self.path.is_dir() and any(entry.name != LOCK for entry in self.path.iterdir())

    def _check_replaceable(self, overwrite: bool) -> list[Path]:
        """Refuse an existing non-empty directory, unless it is a run, `overwrite` is given and
        everything in it is vggkit's own; returns what overwriting it deletes (nothing without `overwrite`)."""
        if not self._holds_files():
            return []
        if not self.is_run():
            raise VggkitError(f"{self.path} already exists and is not a vggkit run (no {MARKER}); vggkit replaces "
                              "only its own runs: choose another --name or --out")
        if overwrite:
            own, others = self.inventory()
            if others:
                raise VggkitError(f"--overwrite would delete what vggkit did not write in {self.path}: "
                                  f"{_listed(self.path, [entry for entry, _ in others])}; move it out of the run, "
                                  "or choose another --name")
            return own
        if self.resumable_checkpoint() is None:
            raise VggkitError(f"{self.path} holds a run that saved no checkpoint; use --overwrite to replace it, "
                              "or another --name")
        raise VggkitError(f"{self.path} already holds a run; use --resume {self.path} to continue it, "
                          "--overwrite to replace it, or another --name")

    def _clear(self, own: list[Path]) -> None:
        """Remove the old run's own files and folders (inventory), but the lock this process holds.
        A folder is removed only once empty: whatever appeared in it since it was listed stays."""
        for entry in own:
            if entry == self.path / LOCK:
                continue
            if stat.S_ISDIR(os.lstat(entry).st_mode):
                entry.rmdir()
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
        with open_own(self.events_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_events(self) -> list[dict]:
        f = open_own(self.events_path, "r")
        if f is None:
            return []
        with f:
            return [json.loads(line) for line in f.read().splitlines() if line.strip()]

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
