"""`vggkit train --tensorboard`: event files read back with TensorBoard's own reader agree with metrics.csv."""
import csv
import importlib.util

import pytest

from vggkit.cli import main
from vggkit.train import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 512 images in batches of 32: 16 steps an epoch, so the running figures at steps 16, 20 and 32
TINY = dict(data="fashion-mnist-sample", arch="1x8,1x16", fc_width=32, init="xavier", limit=512, test_limit=200,
            val_size=100, batch_size=32, precision="fp32", threads=2)


def events(run_dir):
    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    reader.Reload()
    return reader


def scalars(reader, tag):
    return {event.step: event.value for event in reader.Scalars(tag)}


def csv_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_epoch_scalars_equal_metrics_csv_and_steps_follow_the_console(tmp_path):
    history = train({**TINY, "epochs": 2, "tensorboard": True, "out": str(tmp_path), "name": "tb"}, log=lambda *a: None)
    run = history.run_dir
    reader = events(run)
    rows = csv_rows(run)
    assert len(rows) == 2
    for column in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "images_per_s"):
        logged = scalars(reader, f"epoch/{column}")
        assert sorted(logged) == [1, 2]
        for row in rows:
            assert logged[int(row["epoch"])] == pytest.approx(float(row[column]), rel=1e-5, abs=1e-7), column
    for tag in ("step/train_loss", "step/train_acc", "step/lr", "step/images_per_s"):
        assert sorted(scalars(reader, tag)) == [16, 20, 32]
    assert scalars(reader, "hparam/test_acc")[0] == pytest.approx(history.test_acc, rel=1e-6)
    config = reader.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'arch = "1x8,1x16"' in config and "tensorboard = true" in config
    assert reader.PluginTagToContent("hparams")  # the hyperparameters, for TensorBoard's HParams tab


@pytest.mark.slow
def test_a_resumed_run_appends_to_the_same_event_files(tmp_path):
    run = train({**TINY, "epochs": 1, "tensorboard": True, "out": str(tmp_path), "name": "resumed"},
                log=lambda *a: None).run_dir
    train({"epochs": 2}, resume=run, log=lambda *a: None)
    reader = events(run)
    assert sorted(scalars(reader, "epoch/train_loss")) == [1, 2]
    assert sorted(scalars(reader, "step/train_loss")) == [16, 20, 32]


def test_without_the_package_one_line_says_what_to_install_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    code = main(["train", "--data", "fashion-mnist-sample", "--limit", "64", "--epochs", "1", "--tensorboard",
                 "--out", str(tmp_path), "--name", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'vggkit[tensorboard]'" in err
    assert not (tmp_path / "none").exists()
