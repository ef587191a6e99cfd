"""Inputs that are not regular files (FIFOs, devices) are refused in one line, or skipped where
unreadable files are (special_files.py): before, `predict RUN DIR` with a FIFO named *.png hung even
with --skip-bad, and so did --resume with model.safetensors a FIFO.

Each case asserts the exit code, the one line, that the FIFO is still a FIFO and that no file
changed. Should a reader block on a FIFO again, a watchdog opens the FIFO's other end after a while,
so that the test fails instead of hanging."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggkit.cli import main
from vggkit.train import train

SAMPLE = "fashion-mnist-sample"
TINY = dict(arch="1x8", fc_width=16, init="xavier", input_size=28, limit=200, test_limit=100, val_size=100,
            batch_size=50, epochs=1, lr=0.05, precision="fp32", threads=1, data=SAMPLE)
TINY_FLAGS = ["--arch", "1x8", "--fc-width", "16", "--input-size", "28", "--limit", "200", "--test-limit", "100",
              "--val-size", "100", "--batch-size", "50", "--epochs", "1", "--precision", "fp32", "--threads", "1",
              "--data", SAMPLE]
FIFO = "is a FIFO (named pipe), not a regular file; give a regular file"
NOT_OURS = ("where vggkit writes its own files; vggkit never follows or replaces what it did not create: "
            "remove it")  # a run is checked for what is not its own before anything in it is read (rundir.py)
WATCHDOG_S = 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train({**TINY, "out": str(out), "name": "run"}, progress="none", log=lambda *a, **k: None).run_dir


@pytest.fixture
def place(tmp_path, trained):
    """place(relative path, kind): tmp_path/run (a copy of the tiny run) and tmp_path/images/ok.png,
    with a FIFO (kind "fifo") or a link to /dev/null ("device") put at tmp_path/<relative path>."""
    shutil.copytree(trained, tmp_path / "run")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(tmp_path / "images" / "ok.png")
    watchdogs = []

    def put(relative: str, kind: str = "fifo") -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
            watchdogs.append(Watchdog(path))
        else:
            path.symlink_to(os.devnull)
        return path

    yield put
    for watchdog in watchdogs:
        watchdog.cancel()


class Watchdog:
    """After WATCHDOG_S, opens the FIFO at path for writing and closes it, again and again: a reader
    blocked in open() then reads an empty file and the test fails in its assertions. A process of its
    own: a reader blocked in native code (safetensors) may hold the interpreter's lock."""

    def __init__(self, path: Path):
        self.process = subprocess.Popen(["sh", "-c", 'sleep "$1"; while :; do : > "$2"; sleep 0.1; done', "sh",
                                         str(WATCHDOG_S), str(path)], stderr=subprocess.DEVNULL)

    def cancel(self) -> None:
        self.process.kill()
        self.process.wait()


def regular_files(root: Path) -> dict[str, bytes]:
    """Every regular file under root and its bytes (special files are never opened)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if stat.S_ISREG(p.lstat().st_mode)}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# (what is special, where it lies, the command (ROOT: tmp_path), the exit code, the line on stderr)
CASES = {
    "predict: a FIFO named *.png given": (
        "images/pipe.png", ["predict", "ROOT/run", "ROOT/images/pipe.png", "ROOT/images/ok.png"], 2,
        f"vggkit: error: image ROOT/images/pipe.png {FIFO}; or skip unreadable files with --skip-bad"),
    "predict --skip-bad: a FIFO named *.png given": (
        "images/pipe.png", ["predict", "ROOT/run", "ROOT/images/pipe.png", "ROOT/images/ok.png", "--skip-bad"], 0,
        "skipped 1 unreadable image(s): ROOT/images/pipe.png"),
    "predict: a FIFO named *.png in a folder": (
        "images/pipe.png", ["predict", "ROOT/run", "ROOT/images"], 0, ""),
    "evaluate: weights that are a FIFO": (
        "model.safetensors", ["evaluate", "ROOT/model.safetensors"], 2,
        f"vggkit: error: weights ROOT/model.safetensors {FIFO}"),
    "evaluate: the run's config a FIFO": (
        "run/config.toml", ["evaluate", "ROOT/run"], 2, f"vggkit: error: run config ROOT/run/config.toml {FIFO}"),
    "export: weights that are a FIFO": (
        "model.safetensors", ["export", "ROOT/model.safetensors", "--format", "torchscript", "--out", "ROOT/m.pt"], 2,
        f"vggkit: error: weights ROOT/model.safetensors {FIFO}"),
    "--config a FIFO": (
        "my.toml", ["train", "--config", "ROOT/my.toml"], 2, f"vggkit: error: config file ROOT/my.toml {FIFO}"),
    "--init a FIFO": (
        "init.safetensors", ["train", *TINY_FLAGS, "--init", "ROOT/init.safetensors", "--out", "ROOT/new"], 2,
        f"vggkit: error: initial weights ROOT/init.safetensors {FIFO}"),
    "--resume: model.safetensors a FIFO": (
        "run/checkpoints/last/model.safetensors", ["train", "--resume", "ROOT/run", "--epochs", "2"], 2,
        f"vggkit: error: ROOT/run holds checkpoints/last/model.safetensors (a FIFO) {NOT_OURS}"),
    "--resume: state.pt a FIFO": (
        "run/checkpoints/last/state.pt", ["train", "--resume", "ROOT/run", "--epochs", "2"], 2,
        f"vggkit: error: ROOT/run holds checkpoints/last/state.pt (a FIFO) {NOT_OURS}"),
    "--resume: config.toml a FIFO": (
        "run/config.toml", ["train", "--resume", "ROOT/run", "--epochs", "2"], 2,
        f"vggkit: error: run config ROOT/run/config.toml {FIFO}"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_fifo_is_refused_or_skipped_never_read(tmp_path, place, capsys, case):
    relative, argv, code, line = CASES[case]
    fifo = place(relative)
    before = regular_files(tmp_path)
    got, out, err = run_cli(capsys, *(a.replace("ROOT", str(tmp_path)) for a in argv))
    assert (got, err.strip()) == (code, line.replace("ROOT", str(tmp_path)))
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    if argv[0] == "predict" and code == 0:
        assert out.startswith(f"{tmp_path}/images/ok.png: ") and out.count("\n") == 1
    assert regular_files(tmp_path) == before


DEVICE_CASES = {
    "--config": ("dev.toml", ["train", "--config", "ROOT/dev.toml"], 2, "config file ROOT/dev.toml is a character "
                 "device, not a regular file; give a regular file"),
    "predict --skip-bad": ("images/dev.png", ["predict", "ROOT/run", "ROOT/images/dev.png", "ROOT/images/ok.png",
                                              "--skip-bad"], 0, "skipped 1 unreadable image(s): ROOT/images/dev.png"),
    "--init": ("dev.pth", ["train", *TINY_FLAGS, "--init", "ROOT/dev.pth", "--out", "ROOT/new"], 2,
               "initial weights ROOT/dev.pth is a character device, not a regular file; give a regular file"),
}


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_a_device_is_refused_or_skipped(tmp_path, place, capsys, case):
    """A link to a device (/dev/null: a regression reads an empty file, never one without end)."""
    relative, argv, code, line = DEVICE_CASES[case]
    place(relative, "device")
    before = regular_files(tmp_path)
    got, _, err = run_cli(capsys, *(a.replace("ROOT", str(tmp_path)) for a in argv))
    assert got == code
    assert err.strip().removeprefix("vggkit: error: ") == line.replace("ROOT", str(tmp_path))
    assert regular_files(tmp_path) == before
    assert (tmp_path / relative).resolve() == Path(os.devnull)


def test_training_passes_over_a_fifo_among_the_images(tmp_path, place, capsys):
    """As it passes over any file that is not an image: the FIFO is never opened."""
    for label in ("a", "b"):
        for i in range(6):
            (tmp_path / "folder" / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "images" / "ok.png", tmp_path / "folder" / label / f"{i}.png")
    place("folder/a/pipe.png")
    code, out, err = run_cli(capsys, "train", "--data", tmp_path / "folder", "--arch", "1x8", "--fc-width", "16",
                             "--epochs", "1", "--threads", "1", "--out", tmp_path / "runs", "--name", "f", "--quiet")
    assert (code, err) == (0, "")
    assert stat.S_ISFIFO((tmp_path / "folder" / "a" / "pipe.png").lstat().st_mode)
