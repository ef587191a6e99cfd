"""Weight averaging (ema.py, train --ema): the average's arithmetic, its checkpoints, its use by
evaluate/predict/export (--raw-weights for the raw weights), resume, NaN checks and bad values."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import importlib
from vggkit.checkpoint import EMA_PREFIX, load_model, read_meta, save_checkpoint
from vggkit.cli import main
from vggkit.ema import EMA
from vggkit.errors import VggkitError
from vggkit.evaluate import evaluate, format_report
from vggkit.export import export_model
from vggkit.model import VGG
from vggkit.predict import predict_logits
from vggkit.train import TrainingDiverged, train
from helpers import like_trained

train_module = importlib.import_module("vggkit.train")  # the package's `train` is the function
trainer_module = importlib.import_module("vggkit.trainer")  # set_up and restore make the average

SAMPLE = "fashion-mnist-sample"
# 600 training images in batches of 100: 6 steps an epoch, the average updated at every second one
TINY = dict(arch="1x8,1x16", input_size=28, fc_width=32, batch_norm=True, init="xavier", dropout=0.2, epochs=2,
            batch_size=100, lr=0.05, limit=600, test_limit=200, val_size=100, precision="fp32", flip=True,
            crop_padding=2, data=SAMPLE, threads=1, ema=0.9, ema_every=2)


def tiny(tmp_path, **changes):
    return {**TINY, "out": str(tmp_path), "name": "run", **changes}


def quiet(*args, **kwargs):
    pass


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def move(model: nn.Module) -> dict:
    """Change every weight and statistic of `model` (one training batch's worth); returns the new state."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor.float()).to(tensor.dtype) if tensor.is_floating_point() else 1)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The arithmetic

def test_update_is_the_hand_computed_average_with_warm_up():
    model = small_net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.5)
    late = move(model)
    ema.update(model, step=100)  # past the warm-up: the decay itself, 0.5
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.5 * start[key] + 0.5 * late[key]), key
        else:  # num_batches_tracked is copied
            assert torch.equal(value, late[key])

    model = small_net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.999)
    first = move(model)
    ema.update(model, step=1)  # warm-up: min(0.999, 2 / 11), so the first update is mostly the new weights
    decay = 2 / 11
    assert ema.decay_at(1) == decay and ema.decay_at(10**6) == 0.999
    weight = ema.state_dict()["0.weight"]
    assert torch.allclose(weight, decay * start["0.weight"] + (1 - decay) * first["0.weight"])


def test_every_k_steps_updates_with_the_decay_to_the_kth_power():
    model = small_net()
    start = model.state_dict()["0.weight"].clone()
    ema = EMA(model, decay=0.9, every=3)
    move(model)
    ema.update(model, step=1)
    ema.update(model, step=2)
    assert torch.equal(ema.state_dict()["0.weight"], start)  # steps 1 and 2: nothing
    ema.update(model, step=3)
    decay = min(0.9, 4 / 13) ** 3
    assert torch.allclose(ema.state_dict()["0.weight"], decay * start + (1 - decay) * model.state_dict()["0.weight"])


def test_the_update_is_one_fused_lerp(monkeypatch):
    model = VGG("1x8,1x16", in_channels=1, num_classes=10, input_size=28, fc_width=32, batch_norm=True)
    ema = EMA(model, decay=0.99)
    calls = []
    original = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or original(*a))
    move(model)
    ema.update(model, step=5)
    floating = sum(v.is_floating_point() for v in model.state_dict().values())
    assert calls == [floating]  # every parameter and batch-norm statistic in one call


@pytest.mark.slow
def test_a_wrapped_or_half_precision_model_gives_an_fp32_shadow_under_the_networks_keys():
    model = small_net()
    compiled = torch.compile(model)  # not run: only the wrapper
    ema = EMA(compiled, decay=0.9)
    assert list(ema.state_dict()) == list(model.state_dict())
    move(model)
    ema.update(compiled, step=50)
    assert not torch.equal(ema.state_dict()["0.weight"], small_net().state_dict()["0.weight"])

    half = small_net().to(torch.bfloat16)
    ema = EMA(half, decay=0.9)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values() if v.is_floating_point())
    ema.update(half, step=50)
    assert torch.allclose(ema.state_dict()["0.weight"], half.state_dict()["0.weight"].float())


def test_bad_settings_are_refused():
    with pytest.raises(VggkitError, match="decay"):
        EMA(small_net(), decay=1.0)
    with pytest.raises(VggkitError, match="every"):
        EMA(small_net(), decay=0.9, every=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints

META = {"classes": [str(i) for i in range(10)], "mean": [0.3], "std": [0.35], "input_size": 28, "dataset": "drawn"}


def averaged_checkpoint(directory):
    """A checkpoint whose raw and averaged weights differ (and give different logits)."""
    torch.manual_seed(0)
    model = like_trained(VGG("1x8,1x16", in_channels=1, num_classes=10, input_size=28, fc_width=32, batch_norm=True),
                         weight_noise=0.1)
    ema = EMA(model, decay=0.9, every=2)
    move(model)
    save_checkpoint(directory, model, META, averaged=ema)
    return model, ema


def test_checkpoint_round_trip_of_raw_and_averaged_weights(tmp_path):
    model, ema = averaged_checkpoint(tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(stored) == set(model.state_dict()) | {EMA_PREFIX + k for k in model.state_dict()}
    assert read_meta(tmp_path / "ckpt")["ema"] == {"decay": 0.9, "every": 2}

    averaged, meta = load_model(tmp_path / "ckpt")
    assert meta["weights"] == "ema"
    assert all(torch.equal(averaged.state_dict()[k], v) for k, v in ema.state_dict().items())
    raw, meta = load_model(tmp_path / "ckpt" / "model.safetensors", averaged=False)
    assert meta["weights"] == "raw" and meta["ema"] == {"decay": 0.9, "every": 2}
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_without_averaging_a_checkpoint_is_as_before(tmp_path):
    history = train(tiny(tmp_path, ema=0.0, epochs=1, limit=300), progress="none", log=quiet)
    for which in ("last", "best"):
        directory = history.run_dir / "checkpoints" / which
        model, meta = load_model(directory)
        assert set(load_file(str(directory / "model.safetensors"))) == set(model.state_dict())  # no ema.* keys
        assert "ema" not in read_meta(directory) and meta["weights"] == "raw"
    assert "ema = 0.0" in (history.run_dir / "config.toml").read_text()


# ---------------------------------------------------------------------------------------------
# Training

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    lines = []
    history = train(tiny(tmp_path_factory.mktemp("ema")), progress="none", log=lines.append)
    return history, lines


@pytest.mark.slow
def test_training_evaluates_and_saves_the_average(straight_run):
    history, lines = straight_run
    assert lines[1].endswith("; ema: decay 0.9, every 2 steps; evaluated with the averaged weights; closing test figure "
                             "also with flip TTA")
    for which in ("last", "best"):
        directory = history.run_dir / "checkpoints" / which
        stored = load_file(str(directory / "model.safetensors"))
        raw, averaged = load_model(directory, averaged=False)[0], load_model(directory)[0]
        assert any(not torch.equal(raw.state_dict()[k], averaged.state_dict()[k]) for k in raw.state_dict())
        assert len(stored) == 2 * len(raw.state_dict())
    # the best checkpoint was chosen and tested with the averaged weights: evaluate sees the same figure
    result = evaluate(history.run_dir, data=SAMPLE, test_limit=200, log=quiet)
    assert result["weights"] == "ema" and result["test_acc"] == pytest.approx(history.best["test_acc"], abs=1e-9)
    assert "weights: averaged (EMA; --raw-weights for the raw ones)" in format_report(result)
    raw = evaluate(history.run_dir, data=SAMPLE, test_limit=200, averaged=False, log=quiet)
    assert raw["weights"] == "raw" and raw["test_loss"] != result["test_loss"]
    assert "weights: raw" in format_report(raw)


@pytest.mark.slow
def test_a_resumed_run_restores_the_average_exactly(tmp_path, straight_run):
    def interrupt(step):
        if step == 3:  # mid-epoch 1, between two updates of the average (every 2 steps)
            os.kill(os.getpid(), signal.SIGINT)

    first = train(tiny(tmp_path, name="resumed"), progress="none", log=quiet, on_step=interrupt)
    assert first.interrupted
    assert any(k.startswith(EMA_PREFIX) for k in load_file(str(first.run_dir / "checkpoints/last/model.safetensors")))
    resumed = train(resume=first.run_dir, progress="none", log=quiet)
    a = load_file(str(straight_run[0].run_dir / "checkpoints/last/model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # raw and averaged alike
    assert [e["val_loss"] for e in resumed.epochs] == [e["val_loss"] for e in straight_run[0].epochs]


class Recording(EMA):
    """An EMA that remembers the steps it was updated at (and the last one made, for the tests)."""
    made = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []
        Recording.made = self

    def update(self, model, step):
        self.steps.append(step)
        super().update(model, step)


class SkippingScaler:
    """A GradScaler stand-in on the CPU that skips the steps named (as fp16 overflow makes it do):
    the optimizer does not step and the scale is lowered."""

    def __init__(self, skip):
        self.skip, self.calls, self.scale_value = skip, 0, 1024.0

    def get_scale(self):
        return self.scale_value

    def scale(self, loss):
        return loss

    def step(self, optimizer):
        self.calls += 1
        if self.calls not in self.skip:
            optimizer.step()

    def update(self):
        self.scale_value *= 0.5 if self.calls in self.skip else 1.0


@pytest.mark.slow
def test_steps_a_scaler_skipped_do_not_update_the_average(tmp_path, monkeypatch):
    original = train_module.set_up

    def with_scaler(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.scaler = SkippingScaler(skip={3, 4})
        return trainer

    monkeypatch.setattr(train_module, "set_up", with_scaler)
    monkeypatch.setattr(trainer_module, "EMA", Recording)
    train(tiny(tmp_path, epochs=1, ema_every=1), progress="none", log=quiet)
    assert Recording.made.steps == [1, 2, 5, 6]


def test_a_nan_average_is_never_saved(tmp_path, monkeypatch):
    def poison(step):
        if step == 4:
            with torch.no_grad():
                next(iter(Recording.made.state_dict().values())).fill_(float("nan"))

    monkeypatch.setattr(trainer_module, "EMA", Recording)
    with pytest.raises(TrainingDiverged, match="NaN or infinite.*no checkpoint was saved"):
        train(tiny(tmp_path), progress="none", log=quiet, on_step=poison)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# evaluate, predict, export and the CLI

def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_predict_and_export_use_the_average_unless_raw_weights(tmp_path, capsys):
    model, ema = averaged_checkpoint(tmp_path / "ckpt")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(image)
    averaged_logits, _ = predict_logits(tmp_path / "ckpt", [image], device="cpu")
    raw_logits, _ = predict_logits(tmp_path / "ckpt", [image], device="cpu", averaged=False)
    assert not torch.allclose(averaged_logits, raw_logits)

    code, out, _ = run_cli(capsys, "predict", tmp_path / "ckpt", image, "--json", "--top-k", "10", "--device", "cpu")
    averaged = {t["index"]: t["probability"] for t in json.loads(out)[0]["top"]}
    code_raw, out, _ = run_cli(capsys, "predict", tmp_path / "ckpt", image, "--json", "--top-k", "10",
                               "--device", "cpu", "--raw-weights")
    raw = {t["index"]: t["probability"] for t in json.loads(out)[0]["top"]}
    assert code == code_raw == 0
    for probabilities, logits in ((averaged, averaged_logits), (raw, raw_logits)):
        assert [probabilities[i] for i in range(10)] == pytest.approx(logits[0].softmax(0).tolist(), abs=1e-6)

    for flags, weights in (((), "ema"), (("--raw-weights",), "raw")):
        out_file = tmp_path / f"{weights}.pt"
        code, out, err = run_cli(capsys, "export", tmp_path / "ckpt", "--format", "torchscript", "--out", out_file,
                                 *flags)
        assert code == 0, err
        assert ("averaged weights" if weights == "ema" else "raw weights") in out
        extra = {"vggkit.json": ""}
        exported = torch.jit.load(str(out_file), _extra_files=extra)
        assert json.loads(extra["vggkit.json"])["weights"] == weights
        x = torch.randn(2, 1, 28, 28)
        expected = (ema.module if weights == "ema" else model.eval())(x)
        assert torch.allclose(exported(x), expected, atol=1e-4)
    assert export_model(tmp_path / "ckpt", "torchscript", out=tmp_path / "again.pt")["weights"] == "ema"


@pytest.mark.parametrize("argv,needle", [
    (["--ema", "1.5"], "ema must be in [0, 1), got 1.5; e.g. --ema 0.999"),
    (["--ema", "-0.1"], "ema must be in [0, 1)"),
    (["--ema-every", "0"], "ema_every must be positive, got 0; e.g. --ema-every 4"),
    (["--ema-every", "two"], "invalid int value"),
])
def test_bad_ema_values_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    code, out, err = run_cli(capsys, "train", "--out", tmp_path, *argv)
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before anything is written
