"""Never save garbage, never lose a checkpoint (issue 13): training saves only finite weights and
says which checkpoint is kept when it diverges, loaders refuse NaN weights, a refused resume changes
nothing, stale temporaries of a killed save go, and a full disk keeps the previous checkpoint.

Every case asserts the exit code and the one-line message and that every checkpoint left behind
loads and is finite. Trainings are tiny (helpers.tiny: the bundled sample, a 1x8 network).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import (QUIET, SAMPLE, STEPS_PER_EPOCH, TINY_FLAGS, assert_checkpoints_sound, checkpoints_in, cli,
                     one_line, snapshot, tiny)
from vggkit import errors
from vggkit.checkpoint import load_model, save_checkpoint
from vggkit.model import VGG
from vggkit.train import TrainingDiverged, train


# ---------------------------------------------------------------------------------------------- never save garbage

def test_a_huge_learning_rate_saves_nothing_and_the_suggested_command_works(tmp_path, capsys):
    command = ["train", *TINY_FLAGS, "--epochs", "2", "--val-size", "0", "--out", tmp_path, "--name", "nan",
               "--quiet"]
    code, err = cli(capsys, *command, "--lr", "1e30")
    assert code == 2 and "no checkpoint was saved" in one_line(err) and "kept" not in err
    assert checkpoints_in(tmp_path) == []
    suggested = re.search(r"the same command with (.*)$", err.strip()).group(1).split()
    assert suggested == ["--lr", "0.1", "--overwrite"]
    code, err = cli(capsys, *command, "--lr", "1e30", *suggested)  # the later --lr wins, as in a shell
    assert code == 0, err
    assert len(assert_checkpoints_sound(tmp_path)) == 2


@pytest.fixture
def model_of_the_run(monkeypatch):
    """The VGG the next train() builds (its weights are what the checkpoints save)."""
    built = []

    def capture(*args, **kwargs):
        built.append(VGG(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr("vggkit.model.VGG", capture)
    return built


def spoil(model_of_the_run, at_step: int, how):
    def on_step(step):
        if step == at_step:
            with torch.no_grad():
                how(model_of_the_run[-1])
    return on_step


def nan_weight(model):
    model.classifier[-1].weight.fill_(float("nan"))


def huge_but_finite_weights(model):  # outputs overflow to inf, the loss is NaN: the --lr 1e30 case
    for p in model.parameters():
        p.fill_(1e30)


@pytest.mark.parametrize("validation", [100, 0], ids=["validation-loss", "one-training-batch"])
@pytest.mark.parametrize("how", [nan_weight, huge_but_finite_weights])
def test_weights_spoiled_by_the_last_update_are_never_saved(tmp_path, model_of_the_run, validation, how):
    """The epoch's last update spoils the weights after the last loss check of the loop: the check
    before saving catches it, on the validation loss or (no validation, no test) on a training batch."""
    config = tiny(tmp_path, val_size=validation, eval_every_epoch_on_test=False, epochs=2)
    with pytest.raises(TrainingDiverged) as error:
        train(config, **QUIET, on_step=spoil(model_of_the_run, STEPS_PER_EPOCH, how))
    message = str(error.value)
    problem = "the weights became NaN or infinite" if how is nan_weight else "the loss of the current weights is nan"
    assert message.startswith(f"{problem} at epoch 1, step {STEPS_PER_EPOCH}") and "\n" not in message
    assert "no checkpoint was saved" in message and "--overwrite" in message
    assert checkpoints_in(tmp_path) == []
    train(config, overwrite=True, **QUIET)  # the next command the message suggests
    assert len(assert_checkpoints_sound(tmp_path)) == 2


def test_divergence_after_a_checkpoint_keeps_it_and_says_which(tmp_path, model_of_the_run):
    config = tiny(tmp_path, epochs=3)
    with pytest.raises(TrainingDiverged) as error:
        train(config, **QUIET, on_step=spoil(model_of_the_run, 2 * STEPS_PER_EPOCH, nan_weight))
    last = tmp_path / "run" / "checkpoints" / "last"
    assert f"at epoch 2, step {2 * STEPS_PER_EPOCH}" in str(error.value)
    assert f"the last good checkpoint {last} is kept" in str(error.value)
    assert load_model(last)[1]["epoch"] == 1 and len(assert_checkpoints_sound(tmp_path)) == 2


@pytest.mark.parametrize("command", [["evaluate", "--test-limit", "10"], ["predict", "IMAGE"],
                                     ["export", "--format", "torchscript"]])
def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(tmp_path, capsys, command):
    model = VGG("1x8", in_channels=1, input_size=28, fc_width=16)
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = float("inf")
    save_checkpoint(tmp_path / "nan", model, {"classes": [str(i) for i in range(10)], "mean": [0.0], "std": [1.0],
                                              "input_size": 28, "dataset": SAMPLE})
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("L", (28, 28)).save(image)
    name, *options = command
    code, err = cli(capsys, name, tmp_path / "nan", *[str(image) if o == "IMAGE" else o for o in options])
    assert code == 2 and "holds NaN or infinite weights (1 tensors, first classifier.1.weight)" in one_line(err)
    assert "train again with a lower --lr" in err and sorted(p.name for p in (tmp_path / "nan").iterdir()) == \
        ["model.safetensors"]


# ---------------------------------------------------------------------------------------------- resume, temporaries

def test_resume_with_an_invalid_epoch_count_changes_nothing(tmp_path, capsys):
    run = train(tiny(tmp_path), **QUIET).run_dir
    before = snapshot(tmp_path, leave_out=run / ".lock")
    code, err = cli(capsys, "train", "--resume", run, "--epochs", "-3")
    assert code == 2 and "epochs must be positive" in one_line(err)
    assert snapshot(tmp_path, leave_out=run / ".lock") == before and 'epochs = 1' in (run / "config.toml").read_text()


@pytest.mark.slow
def test_stale_temporaries_of_a_killed_save_go_with_the_next_save(tmp_path):
    run = train(tiny(tmp_path), **QUIET).run_dir
    stale = [run / "checkpoints" / ".last.k1ll3d.tmp", run / "checkpoints" / ".best.k1ll3d.tmp"]
    for directory in stale:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
    train({"epochs": 2}, resume=run, **QUIET)
    assert not any(d.exists() for d in stale)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    assert len(assert_checkpoints_sound(run)) == 2


# ---------------------------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp_path/disk (mounting needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint(small_disk, capsys):
    run = train(tiny(small_disk), **QUIET).run_dir
    previous = load_model(run / "checkpoints" / "last")[0].state_dict()
    fill(small_disk, leave=48 * 1024)  # enough to resume, not for another checkpoint (~200 KB)
    with pytest.raises(Exception) as error:
        train({"epochs": 2}, resume=run, **QUIET)
    assert errors.VggkitError not in type(error.value).__mro__  # a failure of the machine, not of the input
    if hasattr(errors, "user_message"):  # the CLI's one place for such errors
        line, code = errors.user_message(error.value)
        assert code == 1 and "no space left on device" in line and "free space" in line
        assert "the previous checkpoint is intact" in line and "\n" not in line
    model, meta = load_model(run / "checkpoints" / "last")
    assert meta["epoch"] == 1 and all(torch.equal(model.state_dict()[k], v) for k, v in previous.items())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]  # no temporary left
    assert len(assert_checkpoints_sound(run)) == 2
    (small_disk / "filler").unlink()
    assert train({"epochs": 2}, resume=run, **QUIET).epochs[-1]["epoch"] == 2  # and the lock was let go
