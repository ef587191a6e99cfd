"""Writing safely (issue 27, items 1-3 and 11): vggkit writes only regular files of its own, never
through a link or in place of a device or FIFO, and --overwrite deletes only what vggkit wrote.

Every refusal asserts the exit code (2), the one line, and that the tree around it is unchanged:
files byte for byte, links with the same target, FIFOs and devices still what they were. Trainings
are the tiny ones of helpers.tiny (the bundled sample, a 1x8 network): about a second each.
"""
import importlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import QUIET, TINY_FLAGS, assert_checkpoints_sound, cli, events, one_line, tiny
from vggkit import checkpoint as checkpoint_module
from vggkit.atomic import NotAFile, atomic_write, atomic_write_text
from vggkit.checkpoint import load_model, read_meta, save_checkpoint
from vggkit.cli import main
from vggkit.evaluate import evaluate
from vggkit.loggers import Logger
from vggkit.model import VGG
from vggkit.rundir import MARKER, RunDir
from vggkit.train import train

evaluate_module = importlib.import_module("vggkit.evaluate")  # vggkit.evaluate is also the function
NOTES = b"three years of notes\n"


def tree(root: Path) -> dict:
    """Everything under root as it is, following no link and opening nothing but regular files:
    a link's target, a FIFO or device as its kind, a file's mode and bytes."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                found[path] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                found[path] = ("file", info.st_mode, info.st_nlink, path.read_bytes())
            else:
                found[path] = (stat.S_IFMT(info.st_mode), info.st_mode, info.st_rdev)
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (two checkpoints), copied by the tests that change it."""
    return train(tiny(tmp_path_factory.mktemp("trained")), **QUIET).run_dir


def copy_run(trained: Path, out: Path, name: str = "x") -> Path:
    return Path(shutil.copytree(trained, out / name, symlinks=True))


def notes(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_bytes(NOTES)
    return path


# ---------------------------------------------------------------------------------------------- 1: the lock

def plant(path: Path, kind: str, target: Path) -> None:
    path.unlink(missing_ok=True)
    if kind == "symbolic link":
        path.symlink_to(target)
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "hard link":
        os.link(target, path)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["new run", "resume"])
@pytest.mark.parametrize("kind,says", [("symbolic link", "symbolic link"), ("FIFO", "FIFO"),
                                       ("hard link", "has 2 names (hard links)")])
def test_a_planted_lock_is_refused_and_its_target_kept(tmp_path, capsys, trained, command, kind, says):
    """RUN/.lock a link to a user's file (guessable run names on a shared --out), a FIFO or a hard
    link: vggkit would truncate the target to write its PID there, or wait on the FIFO."""
    target, runs = notes(tmp_path), tmp_path / "runs"
    if command == "new run":
        (runs / "x").mkdir(parents=True)
        argv = ["train", *TINY_FLAGS, "--out", runs, "--name", "x", "--quiet"]
    else:
        copy_run(trained, runs)
        argv = ["train", "--resume", runs / "x", "--epochs", "2", "--quiet"]
    plant(runs / "x" / ".lock", kind, target)
    before = tree(tmp_path)
    code, err = cli(capsys, *argv)
    assert code == 2 and f"{runs / 'x'}" in one_line(err) and ".lock" in err and says in err
    assert tree(tmp_path) == before and target.read_bytes() == NOTES


# ---------------------------------------------------------------------------------------------- 2: outputs

def make_target(path: Path, kind: str, outside: Path) -> None:
    if kind == "symbolic link":
        path.symlink_to(outside)
    elif kind == "dangling link":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "character device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    elif kind == "folder":
        path.mkdir()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights") / "checkpoint"
    save_checkpoint(folder, VGG("1x8", in_channels=1, input_size=28, fc_width=16),
                    {"classes": [str(i) for i in range(10)], "mean": [0.0], "std": [1.0], "input_size": 28})
    return folder


@pytest.mark.parametrize("command", ["export", "predict --csv"])
@pytest.mark.parametrize("kind", ["symbolic link", "dangling link", "FIFO", "character device", "folder"])
def test_an_output_never_replaces_or_follows_what_is_not_a_regular_file(tmp_path, capsys, weights, command, kind):
    """`export --out /dev/null` as root replaced the device with a file; `predict --csv /proc/self/fd/1`
    replaced the link. Each is refused before anything is written."""
    if command == "export" and kind == "folder":
        pytest.skip("export --out FOLDER writes model.pt inside it")
    out = tmp_path / "out"
    out.mkdir()
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    target = out / "target"
    make_target(target, kind, notes(tmp_path))
    before = tree(tmp_path)
    if command == "export":
        code, err = cli(capsys, "export", weights, "--format", "torchscript", "--out", target)
    else:
        code, err = cli(capsys, "predict", weights, image, "--csv", target)
    shown = "symbolic link" if kind == "dangling link" else kind
    assert code == 2 and f"{target} is a {shown}, not a regular file" in one_line(err)
    assert tree(tmp_path) == before  # the target as it was, no temporary left beside it


def test_what_appears_at_the_target_while_writing_is_not_replaced(tmp_path):
    target, outside = tmp_path / "out.csv", notes(tmp_path)

    def write(tmp):
        Path(tmp).write_text("rows")
        target.symlink_to(outside)  # planted after the first check

    with pytest.raises(NotAFile, match="is a symbolic link, not a regular file"):
        atomic_write(target, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out.csv"]
    assert target.is_symlink() and outside.read_bytes() == NOTES
    atomic_write_text(tmp_path / "plain.txt", "ok")  # a regular file, new or old, is replaced as before
    atomic_write_text(tmp_path / "plain.txt", "again")
    assert (tmp_path / "plain.txt").read_text() == "again"


# ---------------------------------------------------------------------------------------------- 3: --overwrite

def overwrite(capsys, runs: Path, name: str = "x"):
    return cli(capsys, "train", *TINY_FLAGS, "--out", runs, "--name", name, "--overwrite", "--quiet")


def test_overwrite_stops_for_what_the_user_put_in_a_run(tmp_path, capsys, trained):
    run = copy_run(trained, tmp_path / "runs")
    (run / "MYNOTES.txt").write_bytes(NOTES)
    (run / "mydir").mkdir()
    (run / "mydir" / "data.bin").write_bytes(NOTES)
    (run / "checkpoints" / "best" / "my-plot.png").write_bytes(NOTES)
    before = tree(tmp_path)
    code, err = overwrite(capsys, tmp_path / "runs")
    assert code == 2 and one_line(err).endswith(
        f"--overwrite would delete what vggkit did not write in {run}: MYNOTES.txt, checkpoints/best/my-plot.png, "
        "mydir/; move it out of the run, or choose another --name\n")
    assert tree(tmp_path) == before


def test_a_folder_with_a_copied_config_is_not_a_run(tmp_path, capsys, trained):
    folder = tmp_path / "runs" / "x"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "config.toml", folder / "config.toml")  # a real vggkit config
    (folder / "checkpoints" / "model.ckpt").write_bytes(NOTES)
    (folder / "thesis.txt").write_bytes(NOTES)
    before = tree(tmp_path)
    code, err = overwrite(capsys, tmp_path / "runs")
    assert code == 2 and f"{folder} already exists and is not a vggkit run" in one_line(err)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flags", [["--overwrite"], []])
def test_a_run_name_that_is_a_link_is_not_followed(tmp_path, capsys, trained, flags):
    run = copy_run(trained, tmp_path / "runs", "real")
    (run / "keepme.txt").write_bytes(NOTES)
    (tmp_path / "runs" / "alias").symlink_to(run, target_is_directory=True)
    before = tree(tmp_path)
    code, err = cli(capsys, "train", *TINY_FLAGS, "--out", tmp_path / "runs", "--name", "alias", *flags)
    assert code == 2 and f"{tmp_path / 'runs' / 'alias'} is a symbolic link" in one_line(err)
    assert "choose another --name" in err and tree(tmp_path) == before


@pytest.mark.slow
def test_overwrite_replaces_a_run_holding_only_what_vggkit_wrote(tmp_path, capsys):
    """Everything vggkit writes counts as its own: TensorBoard files, evaluate's plots, an export, the
    temporaries a kill leaves (atomic_write's, a checkpoint folder's, safetensors')."""
    pytest.importorskip("tensorboard")
    runs = tmp_path / "runs"
    run = train(tiny(runs, "x", tensorboard=True), **QUIET).run_dir
    assert cli(capsys, "evaluate", run, "--limit", "10", "--compile", "off")[0] == 0
    assert cli(capsys, "export", run, "--format", "torchscript")[0] == 0
    stale = run / "checkpoints" / ".last.k1ll3d.tmp"
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"half")
    (run / ".metrics.csv.k1ll3d.tmp").write_bytes(b"half")
    assert {"tensorboard", "model.pt"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "best" / "evaluation" / "confusion.png").is_file()
    assert RunDir(run).inventory()[1] == []  # nothing that is not vggkit's
    code, err = overwrite(capsys, runs)
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == [".lock", MARKER, "checkpoints", "config.toml", "curves.png",
                                                     "metrics.csv", "metrics.jsonl"]
    assert [e["event"] for e in events(run)] == ["start", "epoch", "end"]
    assert len(assert_checkpoints_sound(run)) == 2


@pytest.mark.parametrize("name", ["metrics.jsonl", "metrics.csv", "curves.png", "config.toml", "checkpoints/last",
                                  "checkpoints"])
def test_a_link_planted_where_a_run_writes_stops_the_resume(tmp_path, capsys, trained, name):
    run = copy_run(trained, tmp_path / "runs")
    planted = run / name
    outside = tmp_path / "outside"
    shutil.move(planted, outside)  # the link points to what was there, so the run would still read it
    planted.symlink_to(outside, target_is_directory=outside.is_dir())
    before = tree(tmp_path)
    code, err = cli(capsys, "train", "--resume", run, "--epochs", "2", "--quiet")
    assert code == 2 and f"{run} holds {name} (a symbolic link) where vggkit writes its own files" in one_line(err)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- 11: the smaller ones

@pytest.mark.slow
def test_a_save_removes_what_a_kill_left_in_a_checkpoint_temporary(tmp_path, trained):
    """A kill while safetensors wrote the weights leaves its own .tmpXXXXXX inside the temporary folder."""
    run = copy_run(trained, tmp_path)
    checkpoints = run / "checkpoints"
    stale = [checkpoints / ".last.k1ll3d.tmp", checkpoints / ".best.k1ll3d.tmp"]
    for folder in stale:
        folder.mkdir()
        (folder / ".tmpXy12Ab").write_bytes(b"half")
    (stale[0] / "state.pt").write_bytes(b"half")
    mine = checkpoints / ".last.mine.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_bytes(NOTES)
    train({"epochs": 2}, resume=run, **QUIET)
    assert not any(folder.exists() for folder in stale)
    assert (mine / "notes.txt").read_bytes() == NOTES  # not vggkit's: left alone


def swap(checkpoint: Path, seed: int) -> None:
    """What a training's next save does to a checkpoint folder: another folder at its name."""
    torch.manual_seed(seed)
    meta = read_meta(checkpoint)
    save_checkpoint(checkpoint, VGG.from_config(meta["model"]), meta)


def test_a_checkpoint_swapped_while_it_is_read_is_read_again(tmp_path, trained, monkeypatch):
    best = copy_run(trained, tmp_path) / "checkpoints" / "best"
    calls = []
    real = checkpoint_module._load_model

    def swapped_under_it(*args):
        calls.append(args[0])
        if len(calls) == 1:  # found, then replaced before it was read
            swap(best, seed=1)
            raise FileNotFoundError(2, "No such file or directory", str(best / "model.safetensors"))
        return real(*args)

    monkeypatch.setattr(checkpoint_module, "_load_model", swapped_under_it)
    model, _ = load_model(best.parent.parent)
    assert len(calls) == 2
    new = real(best, "cpu", True)[0].state_dict()  # the weights that replaced the ones looked up first
    assert all(torch.equal(value, new[key]) for key, value in model.state_dict().items())

    calls.clear()

    def gone(*args):
        calls.append(args[0])
        raise FileNotFoundError(2, "No such file or directory", str(best / "model.safetensors"))

    monkeypatch.setattr(checkpoint_module, "_load_model", gone)
    with pytest.raises(FileNotFoundError):  # not swapped: a real error, read once
        load_model(best)
    assert len(calls) == 1


@pytest.mark.slow
def test_evaluate_while_a_training_saves_reports_what_it_read(tmp_path, trained, monkeypatch, capsys):
    """evaluate writes its plots into the checkpoint folder it read; a training's save replaced that
    folder meanwhile: the figures are reported, the plots are not put into the new folder."""
    run = copy_run(trained, tmp_path)
    best = run / "checkpoints" / "best"
    real_score = evaluate_module._score

    def score(*args, **kwargs):
        swap(best, seed=1)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "_score", score)
    assert main(["evaluate", str(run), "--limit", "10", "--compile", "off"]) == 0
    assert capsys.readouterr().out.endswith(f"plots not written: a training replaced {best} while it was evaluated "
                                            "(the figures above are of the checkpoint read before); --out FOLDER "
                                            "keeps them\n")
    result = evaluate(run, test_limit=10, compile="off", log=lambda *a: None)
    assert result["out_dir"] is None and result["checkpoint"] == str(best)
    assert sorted(p.name for p in best.iterdir()) == ["model.safetensors"]  # nothing in the new checkpoint
    assert sorted(p.name for p in best.parent.iterdir()) == ["best", "last"]


@pytest.mark.slow
def test_a_full_standard_output_is_not_called_a_full_disk(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "vggkit", "train", *TINY_FLAGS, "--out", tmp_path,
                               "--name", "x"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr == \
        "vggkit: error: cannot write to the standard output: no space left on device; send it somewhere that takes it\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


class SignalAfterLastEpoch(Logger):
    def __init__(self, last: int):
        self.last = last

    def epoch(self, row):
        if row["epoch"] == self.last:  # its checkpoints are saved: the closing figures come next
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_after_the_last_epoch_still_ends_the_run(tmp_path):
    lines = []
    history = train(tiny(tmp_path, epochs=2, eval_every_epoch_on_test=False), progress="none", log=lines.append,
                    loggers=[SignalAfterLastEpoch(2)])
    run = history.run_dir
    assert history.interrupted and history.test_acc is None  # `vggkit train` exits 130
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [e["event"] for e in events(run)] == ["start", "epoch", "epoch", "end"]
    assert lines[-1] == (f"SIGTERM after the last epoch: every checkpoint is saved and the curves are drawn; closing "
                         f"test figures not yet begun were skipped (vggkit evaluate {run} gives them)")
    assert len(assert_checkpoints_sound(run)) == 2


def c_locale() -> dict:
    return {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


@pytest.mark.slow
def test_unicode_paths_work_in_the_c_locale(tmp_path):
    """LC_ALL=C PYTHONUTF8=0: Python reads file names as ASCII; vggkit runs in UTF-8 mode instead."""
    out = tmp_path / "données"
    done = subprocess.run([sys.executable, "-m", "vggkit", "train", *TINY_FLAGS, "--out", out, "--name", "é",
                           "--quiet"], env=c_locale(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f'out = "{out}"' in (out / "é" / "config.toml").read_text(encoding="utf-8")
    image = tmp_path / "ïmage.png"
    Image.new("L", (28, 28)).save(image)
    done = subprocess.run([sys.executable, "-m", "vggkit", "predict", out / "é", image, "--csv", tmp_path / "ö.csv"],
                          env=c_locale(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ö.csv").read_text(encoding="utf-8").splitlines()[1].startswith(f"{image},")
