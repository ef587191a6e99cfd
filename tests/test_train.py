"""Training runs on small slices of the bundled Fashion-MNIST sample or on images the tests make (a few
seconds each), so they run in any clone; one runs on the real Fashion-MNIST files when they are there."""
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
from vggkit.loggers import Logger
from vggkit.train import TrainingDiverged, train

SAMPLE = "fashion-mnist-sample"
TINY = dict(arch="1x8,1x16", input_size=28, fc_width=32, batch_norm=True, init="xavier", dropout=0.2, epochs=2, batch_size=100,
            lr=0.05, limit=1000, test_limit=500, val_size=200, precision="fp32", flip=True, crop_padding=2,
            data=SAMPLE, threads=2)


def tiny(tmp_path, **changes):
    return {**TINY, "out": str(tmp_path), "name": "run", **changes}


class Recorder(Logger):
    """Remembers what the loop told it."""

    def __init__(self):
        self.calls = []

    def start(self, info):
        self.calls.append(("start", info.resumed, info.epochs, info.batches))

    def epoch_start(self, epoch, first_batch):
        self.calls.append(("epoch_start", epoch, first_batch))

    def step(self, step, metrics):
        self.calls.append(("step", step, sorted(metrics)))

    def epoch(self, row):
        self.calls.append(("epoch", row["epoch"]))

    def interrupted(self, stop):
        self.calls.append(("interrupted", stop.signal, stop.epoch, stop.step, stop.mid_epoch))

    def end(self, summary):
        self.calls.append(("end", len(summary.rows), summary.test_acc))


def weights(run_dir, which="last"):
    return load_file(str(run_dir / "checkpoints" / which / "model.safetensors"))


@pytest.mark.slow
def test_run_writes_every_file_and_tells_every_logger(tmp_path):
    lines, recorder = [], Recorder()
    history = train(tiny(tmp_path), progress="none", log=lines.append, loggers=[recorder])
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

    assert lines[0] == "vggkit: fashion-mnist (bundled sample (500 train + 100 test images per class of " \
        "Fashion-MNIST)) [bundled sample: accuracy not comparable to published figures]"
    assert lines[1] == "data: train 1,000, val 200, test 500 images; input 28x28 (native); batch 100, lr 0.05, " \
        "10 steps per epoch, 2 epochs; augment: crop 2, flip; closing test figure also with flip TTA"
    assert lines[2].startswith("device: cpu (fp32, channels-last, 2 threads") and \
        lines[2].endswith(f"; 27,802 parameters; run dir {run}")
    assert lines[3].startswith("epoch 1/2, train loss ") and ", val acc " in lines[3] and " img/s)" in lines[3]
    best = max(reversed(history.epochs), key=lambda row: row["val_acc"])  # of equals, the later
    assert history.best == best | {k: history.best[k] for k in ("tta_test_loss", "tta_test_acc", "tta")}
    assert history.best["tta"] == "flip, 2 views"  # decided from the data: it trains with flips
    assert lines[5] == f"best checkpoint (what evaluate, predict and export use): epoch {best['epoch']} of 2 " \
        f"by val acc {best['val_acc']:.4f}; test acc {best['test_acc']:.4f}, with TTA (flip, 2 views) " \
        f"{history.best['tta_test_acc']:.4f}"
    assert lines[6] == f"last epoch: loss {history.epochs[-1]['train_loss']:.3f}, train acc " \
        f"{history.epochs[-1]['train_acc']:.3f}, test acc {history.test_acc:.3f}"
    assert lines[7].endswith(f"examples/sec on cpu; total {history.seconds:.1f} s; run dir {run}") and len(lines) == 8

    calls = recorder.calls
    assert calls[0] == ("start", False, 2, 10) and calls[1] == ("epoch_start", 1, 0)
    assert [c[1] for c in calls if c[0] == "step"] == list(range(1, 21))
    with_metrics = [c[1] for c in calls if c[0] == "step" and c[2]]
    assert with_metrics == [10, 20] and calls[11] == ("step", 10, ["acc", "images_per_s", "loss", "lr"])
    assert calls[12:14] == [("epoch", 1), ("epoch_start", 2, 0)]
    assert calls[-2:] == [("epoch", 2), ("end", 2, history.test_acc)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    return train(tiny(tmp_path_factory.mktemp("straight")), progress="none", log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at,saved", [(5, "at epoch 1, step 5"), (10, "after epoch 1")])
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, straight_run, stop_at, saved):
    def interrupt(step):
        if step == stop_at:  # through the real signal handler: mid-epoch 1, or at its last batch
            os.kill(os.getpid(), signal.SIGINT)

    lines, recorder = [], Recorder()
    first = train(tiny(tmp_path, name="resumed"), progress="none", log=lines.append, on_step=interrupt,
                  loggers=[recorder])
    assert first.interrupted and first.test_acc is None
    assert lines[-1] == f"SIGINT: saved a checkpoint {saved}; resume with: vggkit train --resume {first.run_dir}"
    assert recorder.calls[-1] == ("interrupted", "SIGINT", 1, stop_at, stop_at == 5)
    state = torch.load(first.run_dir / "checkpoints/last/state.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == ((1, 5, 5) if stop_at == 5 else (2, 0, 10))
    events = [json.loads(l)["event"] for l in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events == (["start", "interrupted"] if stop_at == 5 else ["start", "epoch"])

    lines, recorder = [], Recorder()
    resumed = train(resume=first.run_dir, progress="none", log=lines.append, loggers=[recorder])
    assert lines[0] == f"resuming {first.run_dir} at epoch {state['epoch']}, batch {state['batch']}"
    assert recorder.calls[0][:2] == ("start", True) and recorder.calls[1] == ("epoch_start", state["epoch"],
                                                                               state["batch"])
    a, b = weights(straight_run.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["train_loss"] for e in resumed.epochs] == [e["train_loss"] for e in straight_run.epochs]
    assert resumed.test_acc == straight_run.test_acc
    assert len((resumed.run_dir / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_a_resumed_run_may_train_longer_but_not_change_its_recipe(tmp_path, straight_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", straight_run.run_dir, "--lr", "0.5")
    assert code == 2 and "drop the lr option" in err and err.count("\n") == 1
    longer = train({"epochs": 3}, resume=straight_run.run_dir, progress="none", log=lambda *a: None)
    assert [e["epoch"] for e in longer.epochs] == [1, 2, 3]
    assert longer.epochs[:2] == straight_run.epochs


@pytest.mark.slow
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


@pytest.mark.slow
def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
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
        train(tiny(tmp_path), progress="none", log=lambda *a: None, on_step=poison)
    model, meta = load_model(tmp_path / "run" / "checkpoints" / "last")
    assert meta["epoch"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    events = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == {"event": "diverged", "epoch": 2, "step": 20}  # found at the epoch's last step


@pytest.mark.slow
def test_diverging_lr_from_cli_is_one_line_exit_2(tmp_path, capsys):
    code = main(["train", "--arch", "1x8", "--input-size", "28", "--fc-width", "16", "--limit", "600",
                 "--test-limit", "100", "--val-size", "0", "--epochs", "1", "--batch-size", "20", "--lr", "1e30",
                 "--data", SAMPLE, "--out", str(tmp_path), "--name", "nan", "--quiet",
                 "--precision", "fp32", "--no-batch-norm"])
    err = capsys.readouterr().err
    assert code == 2 and "lower the learning rate" in err and err.count("\n") == 1


@pytest.mark.slow
def test_evaluate_and_predict_agree_with_training(tmp_path):
    history = train(tiny(tmp_path, epochs=1), progress="none", log=lambda *a: None)
    last = history.run_dir / "checkpoints" / "last"
    result = evaluate(last, data=SAMPLE, test_limit=500, log=lambda *a: None)
    assert result["test_acc"] == pytest.approx(history.test_acc, abs=1e-9)
    assert sum(result["per_class"][c] * 0 + 1 for c in result["classes"]) == 10
    assert np.trace(np.array(result["confusion"])) == round(result["test_acc"] * 500)
    assert (last / "evaluation" / "confusion.png").is_file() and (last / "evaluation" / "misclassified.png").is_file()

    from vggkit.data import load_data
    test = load_data(SAMPLE, val_size=0, test_limit=500).test
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


def test_training_on_an_image_folder_learns_its_classes(tmp_path):
    """RGB images the test paints: red, green and blue squares with noise, one folder per class."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(("blue", "green", "red")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(30):
            image = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
            image[..., index] += 150
            Image.fromarray(image).save(tmp_path / "images" / name / f"{i}.png")
    history = train({"data": str(tmp_path / "images"), "arch": "1x8", "input_size": 12, "fc_width": 16, "epochs": 2,
                     "init": "xavier", "batch_size": 10, "lr": 0.05, "precision": "fp32", "val_size": 15, "threads": 2,
                     "out": str(tmp_path), "name": "folder"}, progress="none", log=lambda *a: None)
    assert history.test_acc == 1.0 and history.epochs[-1]["val_acc"] == 1.0  # a flat folder gets a held-out test split
    [top] = predict(history.run_dir, [tmp_path / "images" / "green" / "0.png"], top_k=1)
    assert top["top"][0]["class"] == "green"


@pytest.mark.slow
def test_training_on_the_real_fashion_mnist_files(tmp_path, fmnist_dir):
    lines = []
    history = train(tiny(tmp_path, data="fashion-mnist", data_dir=str(fmnist_dir), allow_sample=False),
                    progress="none", log=lines.append)
    assert lines[0] == f"vggkit: fashion-mnist ({fmnist_dir} (gz files))"
    assert 0.3 < history.test_acc <= 1


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_cli_train_evaluate_predict_roundtrip(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('[train]\narch = "1x8,1x16"\ninput_size = 28\nfc_width = 32\nepochs = 1\nlimit = 600\n'
                      'test_limit = 200\nval_size = 100\nbatch_size = 100\nprecision = "fp32"\n'
                      f'data = "{SAMPLE}"\n')
    code, out, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path, "--name", "cli", "--lr", "0.05")
    assert code == 0, err
    assert "device: cpu" in out and "epoch 1/1" in out and "examples/sec" in out
    saved = (tmp_path / "cli" / "config.toml").read_text()
    assert 'arch = "1x8,1x16"' in saved and "lr = 0.05" in saved and 'preset = "fast"' in saved
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "cli", "--data", SAMPLE, "--test-limit", 200)
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


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, capsys):
    history = train(tiny(tmp_path, name="taken", epochs=1), progress="none", log=lambda *a: None)
    before = {p: p.read_bytes() for p in history.run_dir.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "train", "--out", tmp_path, "--name", "taken", "--data", SAMPLE)
    assert code == 2 and "already holds a run" in err and "--resume" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in history.run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_damaged_or_foreign_checkpoints_are_refused(tmp_path, capsys):
    history = train(tiny(tmp_path, epochs=1), progress="none", log=lambda *a: None)
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
    assert code == 2 and "they disagree (the file is damaged)" in err and err.count("\n") == 1  # from its header
