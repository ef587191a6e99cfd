"""Training runs on small slices of the real Fashion-MNIST (a few seconds each)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vggkit import evaluate, load, predict
from vggkit.checkpoint import load_model
from vggkit.cli import main
from vggkit.train import TrainingDiverged, train

TINY = dict(arch="1x8,1x16", input_size=28, fc_width=32, batch_norm=True, init="xavier", dropout=0.2, epochs=2, batch_size=100,
            lr=0.05, limit=1000, test_limit=500, val_size=200, precision="fp32", flip=True, crop_padding=2,
            allow_sample=False, threads=2)


def tiny(tmp_path, fmnist_dir, **changes):
    return {**TINY, "data_dir": str(fmnist_dir), "out": str(tmp_path), "name": "run", **changes}


def weights(run_dir, which="last"):
    return load_file(str(run_dir / "checkpoints" / which / "model.safetensors"))


def test_run_writes_every_file(tmp_path, fmnist_dir):
    history = train(tiny(tmp_path, fmnist_dir), progress="none", log=lambda *a: None)
    run = history.run_dir
    for name in ("config.toml", "metrics.csv", "metrics.jsonl", "curves.png", "checkpoints/last/model.safetensors",
                 "checkpoints/last/state.pt", "checkpoints/best/model.safetensors"):
        assert (run / name).is_file(), name
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc") and len(rows) == 3
    assert [json.loads(l)["event"] for l in (run / "metrics.jsonl").read_text().splitlines()] == \
        ["start", "epoch", "epoch", "end"]
    assert "arch = \"1x8,1x16\"" in (run / "config.toml").read_text()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.3 < history.test_acc <= 1 and len(history.epochs) == 2
    state = torch.load(run / "checkpoints/last/state.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 2 * 10  # 1,000 training images / batch 100


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, fmnist_dir):
    straight = train(tiny(tmp_path, fmnist_dir, name="straight"), progress="none", log=lambda *a: None)

    def interrupt(step):
        if step == 5:  # mid-epoch 1, through the real signal handler
            os.kill(os.getpid(), signal.SIGINT)

    lines = []
    first = train(tiny(tmp_path, fmnist_dir, name="resumed"), progress="none", log=lines.append, on_step=interrupt)
    assert first.interrupted and any("resume with: vggkit train --resume" in l for l in lines)
    assert torch.load(first.run_dir / "checkpoints/last/state.pt", weights_only=True)["step"] == 5
    resumed = train(resume=first.run_dir, progress="none", log=lambda *a: None)
    a, b = weights(straight.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.epochs == straight.epochs or [e["train_loss"] for e in resumed.epochs] == \
        [e["train_loss"] for e in straight.epochs]
    assert resumed.test_acc == straight.test_acc


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from vggkit import VGG
        from vggkit.checkpoint import save_checkpoint
        model = VGG("1x64,1x128", in_channels=1, input_size=28, fc_width=2048)
        state = {{"optimizer": {{"big": torch.randn(2_000_000)}}, "step": 0}}
        i = 0
        while True:
            i += 1
            with torch.no_grad():
                model.classifier[1].bias.fill_(i)
            save_checkpoint(r"{tmp_path}/ckpt/last", model, {{"i": i}}, state)
            if i == 1:
                print("ready", flush=True)  # a first checkpoint exists: every later kill must leave one
    """)
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model, meta = load_model(tmp_path / "ckpt" / "last")
        assert meta["i"] >= 1 and torch.all(model.classifier[1].bias == meta["i"])


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, fmnist_dir, monkeypatch):
    def poison(step):
        if step == 13:  # epoch 2: the weights become NaN
            model_param = next(iter(poison.model.parameters()))
            with torch.no_grad():
                model_param.fill_(float("nan"))

    import vggkit.model as model_module
    original = model_module.VGG

    def capture(*args, **kwargs):
        poison.model = original(*args, **kwargs)
        return poison.model

    monkeypatch.setattr(model_module, "VGG", capture)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train(tiny(tmp_path, fmnist_dir), progress="none", log=lambda *a: None, on_step=poison)
    model, meta = load_model(tmp_path / "run" / "checkpoints" / "last")
    assert meta["epoch"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_diverging_lr_from_cli_is_one_line_exit_2(tmp_path, fmnist_dir, capsys):
    code = main(["train", "--arch", "1x8", "--input-size", "28", "--fc-width", "16", "--limit", "600",
                 "--test-limit", "100", "--val-size", "0", "--epochs", "1", "--batch-size", "20", "--lr", "1e30",
                 "--data-dir", str(fmnist_dir), "--out", str(tmp_path), "--name", "nan", "--quiet",
                 "--precision", "fp32", "--no-batch-norm"])
    err = capsys.readouterr().err
    assert code == 2 and "lower the learning rate" in err and err.count("\n") == 1


def test_evaluate_and_predict_agree_with_training(tmp_path, fmnist_dir):
    history = train(tiny(tmp_path, fmnist_dir, epochs=1), progress="none", log=lambda *a: None)
    last = history.run_dir / "checkpoints" / "last"
    result = evaluate(last, data_dir=str(fmnist_dir), test_limit=500, log=lambda *a: None)
    assert result["test_acc"] == pytest.approx(history.test_acc, abs=1e-9)
    assert sum(result["per_class"][c] * 0 + 1 for c in result["classes"]) == 10
    assert np.trace(np.array(result["confusion"])) == round(result["test_acc"] * 500)
    assert (last / "evaluation" / "confusion.png").is_file() and (last / "evaluation" / "misclassified.png").is_file()

    from vggkit.data import load_data
    test = load_data("fashion-mnist", data_dir=str(fmnist_dir), val_size=0, test_limit=500).test
    paths = []
    for i in range(8):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(test.images[i].squeeze(-1)).save(path)
        paths.append(path)
    predicted = predict(last, paths, top_k=2)
    classes = result["classes"]
    assert [classes.index(p["top"][0]["class"]) for p in predicted] == result["predictions"][:8]
    assert all(p["top"][0]["probability"] >= p["top"][1]["probability"] for p in predicted)
    assert isinstance(load(history.run_dir), torch.nn.Module)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_evaluate_predict_roundtrip(tmp_path, fmnist_dir, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('[train]\narch = "1x8,1x16"\ninput_size = 28\nfc_width = 32\nepochs = 1\nlimit = 600\n'
                      'test_limit = 200\nval_size = 100\nbatch_size = 100\nprecision = "fp32"\n')
    code, out, err = run_cli(capsys, "train", "--config", config, "--data-dir", fmnist_dir, "--out", tmp_path,
                             "--name", "cli", "--lr", "0.05")
    assert code == 0, err
    assert "device: cpu" in out and "epoch 1/1" in out and "examples/sec" in out
    saved = (tmp_path / "cli" / "config.toml").read_text()
    assert 'arch = "1x8,1x16"' in saved and "lr = 0.05" in saved and 'preset = "fast"' in saved
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "cli", "--data-dir", fmnist_dir, "--test-limit", 200)
    assert code == 0 and "per-class accuracy" in out and "Ankle boot" in out
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    code, out, err = run_cli(capsys, "predict", tmp_path / "cli", image, "--json", "--top-k", "3")
    assert code == 0 and len(json.loads(out)[0]["top"]) == 3


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "huge"], "invalid choice"),
    (["--lr", "0"], "positive number"),
    (["--lr", "-1"], "positive number"),
    (["--optimizer", "lbfgs"], "invalid choice"),
    (["--schedule", "step"], "invalid choice"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--config", "/nonexistent.toml"], "does not exist"),
    (["--resume", "/nonexistent-run"], "not a vggkit run"),
])
def test_train_bad_input(capsys, argv, needle):
    code, out, err = run_cli(capsys, "train", *argv)
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_existing_run_is_not_overwritten(tmp_path, fmnist_dir, capsys):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "config.toml").write_text("precious")
    code, _, err = run_cli(capsys, "train", "--out", tmp_path, "--name", "taken", "--data-dir", fmnist_dir)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (run / "config.toml").read_text() == "precious"


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path, fmnist_dir, capsys):
    history = train(tiny(tmp_path, fmnist_dir, epochs=1), progress="none", log=lambda *a: None)
    last = history.run_dir / "checkpoints" / "last"
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)

    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    code, _, err = run_cli(capsys, "predict", last, not_image)
    assert code == 2 and "not a readable image" in err

    state = last / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated training state
    code, _, err = run_cli(capsys, "train", "--resume", history.run_dir)
    assert code == 2 and "damaged" in err

    junk = tmp_path / "junk" / "model.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "predict", junk, image)
    assert code == 2 and "not a readable safetensors file" in err

    # weights from another architecture under this run's metadata
    from safetensors.torch import save_file
    from vggkit.checkpoint import read_meta
    meta = read_meta(last)
    other = tmp_path / "other" / "model.safetensors"
    other.parent.mkdir()
    save_file({"features.0.0.weight": torch.zeros(3, 1, 3, 3)}, str(other),
              metadata={"vggkit": json.dumps(meta)})
    code, _, err = run_cli(capsys, "predict", other, image)
    assert code == 2 and "cannot load weights" in err and err.count("\n") == 1
