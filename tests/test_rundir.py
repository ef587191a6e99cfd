"""The run directory: creating, refusing and replacing runs, finding checkpoints, resume config rules."""
import os
from pathlib import Path

import pytest
import torch

from vggkit import TrainConfig
from vggkit.checkpoint import save_checkpoint
from vggkit.config import save_config
from vggkit.model import VGG
from vggkit.errors import VggkitError
from vggkit.rundir import (LOCK, MARKER, RunDir, RunInUse, RunLock, check_run_name, config_path, evaluation_dir,
                           export_dir, find_checkpoint, find_config, has_resumable_checkpoint)


def saved_run(tmp_path, **config) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save_config(TrainConfig(**{"epochs": 3, "lr": 0.1, "batch_size": 256, "input_size": 28, "val_size": 5000, "flip": True, **config}), run.config_path)  # as decided
    return run


def checkpoint(directory: Path, state: bool = True) -> Path:
    """A checkpoint directory as far as the lookups care: its files exist."""
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"")
    if state:
        torch.save({"step": 7}, directory / "state.pt")
    return directory


# ---------------------------------------------------------------------------------------------- resume config

def test_resume_changes_only_the_resumable_keys(tmp_path):
    run = saved_run(tmp_path)
    config = run.resumed_config({"epochs": 5, "device": "cpu", "threads": 2})
    assert (config.epochs, config.device, config.threads, config.lr) == (5, "cpu", 2, 0.1)


def test_resume_refuses_other_changes_in_one_line_naming_the_option(tmp_path):
    run = saved_run(tmp_path)
    with pytest.raises(VggkitError) as error:
        run.resumed_config({"lr": 0.5})
    message = str(error.value)
    assert "drop the lr option" in message and "only device, epochs, threads may change" in message
    assert str(run.config_path) in message and "\n" not in message


def test_resume_ignores_none_the_preset_and_unchanged_values(tmp_path):
    run = saved_run(tmp_path)
    config = run.resumed_config({"lr": None, "arch": None, "preset": "best", "batch_size": 256, "epochs": None})
    assert (config.lr, config.arch, config.preset, config.epochs) == (0.1, TrainConfig().arch, "fast", 3)
    assert run.resumed_config(None) == config


def test_resume_takes_a_whole_train_config_of_the_same_run(tmp_path):
    run = saved_run(tmp_path)
    same = TrainConfig(epochs=9, lr=0.1)
    assert run.resumed_config(same).epochs == 9
    with pytest.raises(VggkitError, match="drop the lr option"):
        run.resumed_config(TrainConfig(lr=0.2))


@pytest.mark.parametrize("epochs", [-3, 0])
def test_resume_overrides_are_validated_like_a_new_run(tmp_path, epochs):
    run = saved_run(tmp_path)
    before = run.config_path.read_bytes()
    with pytest.raises(VggkitError, match="epochs must be positive"):
        run.resumed_config({"epochs": epochs})
    assert run.config_path.read_bytes() == before


def test_only_a_run_directory_can_be_resumed(tmp_path):
    with pytest.raises(VggkitError, match="is not a vggkit run .* give the run directory to resume"):
        RunDir.existing(tmp_path)
    assert RunDir.existing(saved_run(tmp_path).path).path == tmp_path / "run"


# ---------------------------------------------------------------------------------------------- creating

def test_a_new_run_is_named_after_the_preset_and_the_time(tmp_path):
    run = RunDir.create(TrainConfig(preset="d2l", out=str(tmp_path)), overwrite=False)
    assert run.path.parent == tmp_path and run.path.name.startswith("d2l-20") and not run.path.exists()


def test_an_existing_run_is_refused_or_replaced_only_when_claimed(tmp_path):
    config = TrainConfig(out=str(tmp_path), name="taken")
    (tmp_path / "taken").mkdir()
    assert RunDir.create(config, overwrite=False).path == tmp_path / "taken"  # empty: free to use
    run = RunDir.create(config, overwrite=False)
    run.claim(overwrite=False)
    run.unlock()
    assert (run.path / MARKER).is_file() and run.is_run()
    save_config(config, run.config_path)
    checkpoint(run.last)
    with pytest.raises(VggkitError, match="already holds a run; use --resume .* --overwrite"):
        RunDir.create(config, overwrite=False)
    replaced = RunDir.create(config, overwrite=True)
    assert run.last.is_dir()  # create only checks: nothing is deleted before the data is loaded
    replaced.claim(overwrite=True)
    replaced.unlock()
    assert sorted(p.name for p in run.path.iterdir()) == [LOCK, MARKER]


def test_a_run_without_checkpoint_points_to_overwrite_not_resume(tmp_path):
    config = TrainConfig(out=str(tmp_path), name="empty")
    RunDir.create(config, overwrite=False).claim(overwrite=False)
    with pytest.raises(VggkitError, match="saved no checkpoint; use --overwrite") as error:
        RunDir.create(config, overwrite=False)
    assert "--resume" not in str(error.value)
    with pytest.raises(VggkitError, match="start it again with --overwrite"):
        RunDir(tmp_path / "empty").last_checkpoint()


def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "config.toml").write_text("precious")
    (folder / "checkpoints").mkdir()
    for overwrite in (False, True):
        with pytest.raises(VggkitError, match="already exists and is not a vggkit run .* choose another --name"):
            RunDir.create(TrainConfig(out=str(tmp_path), name="thesis"), overwrite=overwrite)
        with pytest.raises(VggkitError, match="is not a vggkit run"):
            RunDir(folder).claim(overwrite=overwrite)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK, "checkpoints", "config.toml"]
    assert (folder / "config.toml").read_text() == "precious"


def test_a_run_from_before_the_marker_is_recognised(tmp_path):
    run = saved_run(tmp_path)
    assert not run.is_run()  # a config alone is not enough
    checkpoint(run.last)
    assert not run.is_run()  # nor beside files named as checkpoints: the weights must be vggkit's
    (run.last / "model.safetensors").unlink()
    save_checkpoint(run.last, VGG("1x8", in_channels=1, input_size=28, fc_width=16), {})
    assert run.is_run()
    run.claim(overwrite=True)
    assert not run.last.exists() and (run.path / MARKER).is_file()


def test_overwrite_stops_at_a_link_inside_the_run_and_follows_none(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    run = RunDir(tmp_path / "run")
    run.claim(overwrite=False)
    (run.path / "link").symlink_to(outside, target_is_directory=True)
    run.unlock()
    lost = r"--overwrite would delete what vggkit did not write in .*/run: link \(a symbolic link\); move it out"
    with pytest.raises(VggkitError, match=lost):
        run.claim(overwrite=True)
    assert (run.path / "link").is_symlink() and (outside / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("name", [".", "..", "../x", "/abs", "a/b", "a\\b", ""])
def test_a_run_name_is_one_plain_folder_name(tmp_path, name):
    with pytest.raises(VggkitError, match="is not a plain name; give a folder name without"):
        RunDir.create(TrainConfig(out=str(tmp_path), name=name), overwrite=False)
    check_run_name("vgg-11_run.2")


def test_a_locked_run_is_refused_naming_the_holder_and_free_again_after(tmp_path):
    run = RunDir(tmp_path / "run")
    assert RunLock.holder(run.path) is None and not run.path.exists()  # asking creates nothing
    run.claim(overwrite=False)
    assert RunLock.holder(run.path) == os.getpid() and (run.path / LOCK).read_text() == f"{os.getpid()}\n"
    for attempt in (lambda: RunDir.create(TrainConfig(out=str(tmp_path), name="run"), overwrite=True),
                    lambda: RunDir(run.path).lock(), lambda: RunDir(run.path).claim(overwrite=True)):
        with pytest.raises(RunInUse, match=f"in use: process {os.getpid()} is training there") as error:
            attempt()
        assert error.value.pid == os.getpid()
    run.unlock()
    assert RunLock.holder(run.path) is None
    again = RunDir(run.path)
    again.lock()
    again.unlock()


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoints_are_found_best_first_with_the_prev_fallback(tmp_path):
    run = RunDir(tmp_path)
    checkpoint(run.last.with_name("last.prev"))
    assert find_checkpoint(tmp_path) == run.last.with_name("last.prev")
    checkpoint(run.last)
    assert find_checkpoint(tmp_path) == run.last
    checkpoint(run.best.with_name("best.prev"), state=False)
    assert find_checkpoint(tmp_path) == run.best.with_name("best.prev")
    checkpoint(run.best, state=False)
    assert find_checkpoint(tmp_path) == run.best
    assert find_checkpoint(run.last) == run.last and find_checkpoint(run.last / "model.safetensors") == run.last
    with pytest.raises(VggkitError, match="no weights found"):
        find_checkpoint(tmp_path / "elsewhere")


def test_a_run_resumes_from_last_or_its_prev_copy(tmp_path):
    run = saved_run(tmp_path)
    assert not has_resumable_checkpoint(run.path)
    with pytest.raises(VggkitError, match="no checkpoint to resume from"):
        run.read_state()
    checkpoint(run.last.with_name("last.prev"))  # a kill between save_checkpoint's two renames
    assert has_resumable_checkpoint(run.path) and run.read_state() == {"step": 7}
    checkpoint(run.last)
    assert run.last_checkpoint() == run.last


def test_a_damaged_training_state_is_one_line(tmp_path):
    run = saved_run(tmp_path)
    checkpoint(run.last)
    (run.last / "state.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(VggkitError, match="cannot read training state .* the checkpoint is damaged"):
        run.read_state()
    with pytest.raises(VggkitError, match="cannot read weights .* damaged"):
        run.read_weights()


def test_where_config_evaluation_and_exports_go(tmp_path):
    run = saved_run(tmp_path)
    checkpoint(run.best, state=False)
    assert find_config(run.path) == find_config(run.best) == config_path(run.path) == run.config_path
    assert evaluation_dir(run.path) == run.best / "evaluation"
    assert export_dir(run.path) == export_dir(run.best / "model.safetensors") == run.path
    alone = checkpoint(tmp_path / "alone", state=False)
    assert find_config(alone) is None and export_dir(alone) == alone


def test_events_append_and_read_back(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_events() == []
    run.log_event({"event": "start"})
    run.log_event({"event": "epoch", "epoch": 1, "train_acc": 0.5})
    assert run.read_events() == [{"event": "start"}, {"event": "epoch", "epoch": 1, "train_acc": 0.5}]
