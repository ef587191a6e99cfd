"""The run directory: creating, refusing and replacing runs, finding checkpoints, resume config rules."""
from pathlib import Path

import pytest
import torch

from vggkit import TrainConfig
from vggkit.config import save_config
from vggkit.errors import VggkitError
from vggkit.rundir import (RunDir, config_path, evaluation_dir, export_dir, find_checkpoint, find_config,
                           has_resumable_checkpoint)


def saved_run(tmp_path, **config) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save_config(TrainConfig(**{"epochs": 3, "lr": 0.1, "batch_size": 256, **config}), run.config_path)  # as decided
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


def test_only_a_run_directory_can_be_resumed(tmp_path):
    with pytest.raises(VggkitError, match="is not a vggkit run .* give the run directory to resume"):
        RunDir.existing(tmp_path)
    assert RunDir.existing(saved_run(tmp_path).path).path == tmp_path / "run"


# ---------------------------------------------------------------------------------------------- creating

def test_a_new_run_is_named_after_the_preset_and_the_time(tmp_path):
    run = RunDir.create(TrainConfig(preset="d2l", out=str(tmp_path)), overwrite=False)
    assert run.path.parent == tmp_path and run.path.name.startswith("d2l-20") and not run.path.exists()


def test_an_existing_run_is_refused_or_replaced(tmp_path):
    config = TrainConfig(out=str(tmp_path), name="taken")
    (tmp_path / "taken").mkdir()
    assert RunDir.create(config, overwrite=False).path == tmp_path / "taken"  # empty: free to use
    (tmp_path / "taken" / "config.toml").write_text("precious")
    with pytest.raises(VggkitError, match="already holds a run; use --resume .* --overwrite"):
        RunDir.create(config, overwrite=False)
    assert (tmp_path / "taken" / "config.toml").read_text() == "precious"
    RunDir.create(config, overwrite=True)
    assert not (tmp_path / "taken").exists()


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
