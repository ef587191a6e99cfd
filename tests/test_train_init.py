"""`vggkit train --init SOURCE [--freeze N|features] [--head-pool adaptive]` through the CLI, on the
bundled sample: weights built here (to_standard -> .pth, or a vggkit run), one short epoch each."""
import importlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vggkit
from vggkit.checkpoint import read_meta, save_checkpoint
from vggkit.cli import build_parser, main
from vggkit.config import resolve_config
from helpers import like_trained

SAMPLE = "fashion-mnist-sample"
ARCH = "1x8,1x16"  # two blocks: a 7x7 map at 28x28, as the ImageNet weights have at 224
COMMON = ["--data", SAMPLE, "--limit", "512", "--test-limit", "200", "--val-size", "100", "--epochs", "1",
          "--batch-size", "64", "--init-scheme", "xavier", "--precision", "fp32", "--threads", "2"]


def source_model(num_classes=5, in_channels=3):
    """Weights to start from: RGB, another number of classes, batch-norm statistics that are not the defaults."""
    torch.manual_seed(0)
    model = vggkit.VGG(ARCH, in_channels=in_channels, num_classes=num_classes, input_size=28, fc_width=32,
                       batch_norm=True, init="xavier")
    return like_trained(model)


@pytest.fixture
def standard_pth(tmp_path):
    model = source_model()
    path = tmp_path / "weights.pth"
    torch.save(vggkit.to_standard(model), path)
    return path, model.state_dict()


def train_cli(tmp_path, name, *flags):
    return main(["train", *COMMON, "--out", str(tmp_path / "runs"), "--name", name, *flags])


def last_weights(run):
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


@pytest.mark.slow
def test_fine_tuning_a_standard_state_dict_keeps_frozen_blocks_bit_for_bit(tmp_path, standard_pth, capsys):
    path, source = standard_pth
    assert train_cli(tmp_path, "ft", "--init", str(path), "--freeze", "1") == 0
    out = capsys.readouterr().out
    assert "first convolution summed over its 3 input channels" in out
    assert "classifier replaced: the weights have 5 classes, the data 10" in out
    assert "froze block 1 of 2" in out

    run = tmp_path / "runs" / "ft"
    trained = last_weights(run)
    assert torch.equal(trained["features.0.0.weight"], source["features.0.0.weight"].sum(dim=1, keepdim=True))
    frozen = [k for k in source if k.startswith("features.0.") and k != "features.0.0.weight"]
    assert any("running_var" in k for k in frozen)
    assert all(torch.equal(trained[k], source[k]) for k in frozen)  # weights and batch-norm statistics
    assert not torch.equal(trained["features.1.0.weight"], source["features.1.0.weight"])  # block 2 trains
    assert not torch.equal(trained["classifier.1.weight"], source["classifier.1.weight"])  # the head trains
    assert trained["classifier.7.weight"].shape == (10, 32)

    config = tomllib.loads((run / "config.toml").read_text())["train"]
    assert (config["arch"], config["fc_width"], config["batch_norm"]) == (ARCH, 32, True)  # from the weights
    assert (config["init_from"], config["freeze"], config["head_pool"], config["init"]) == \
        (str(path.resolve()), 1, "none", "xavier")
    assert main(["evaluate", str(run), "--data", SAMPLE, "--test-limit", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 100


@pytest.mark.slow
def test_another_input_size_gets_the_adaptive_head_pool_and_the_run_exports(tmp_path, standard_pth, capsys):
    path, _ = standard_pth
    assert train_cli(tmp_path, "ft32", "--init", str(path), "--input-size", "32") == 0
    assert "head_pool adaptive" in capsys.readouterr().out
    run = tmp_path / "runs" / "ft32"
    assert read_meta(run)["model"]["head_pool"] == "adaptive"
    assert vggkit.load(run).head_pool == "adaptive"
    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert (run / "model.onnx").is_file()


@pytest.mark.slow
def test_from_a_run_directory_with_frozen_features_and_resume_without_reloading(tmp_path, monkeypatch, capsys):
    assert train_cli(tmp_path, "base", "--arch", ARCH, "--fc-width", "32") == 0
    base = tmp_path / "runs" / "base"
    assert train_cli(tmp_path, "ft", "--init", str(base), "--freeze", "features", "--lr", "0.01") == 0
    run = tmp_path / "runs" / "ft"
    start = load_file(str(base / "checkpoints" / "best" / "model.safetensors"))
    after_one = last_weights(run)
    features = [k for k in start if k.startswith("features.")]
    assert all(torch.equal(after_one[k], start[k]) for k in features)
    assert not torch.equal(after_one["classifier.7.weight"], start["classifier.7.weight"])

    def no_reload(*args, **kwargs):
        raise AssertionError("a resumed run must not load its initial weights again")

    monkeypatch.setattr(importlib.import_module("vggkit.trainer"), "init_model", no_reload)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    after_two = last_weights(run)
    assert all(torch.equal(after_two[k], start[k]) for k in features)  # still frozen after the resume
    assert not torch.equal(after_two["classifier.7.weight"], after_one["classifier.7.weight"])


def test_the_architecture_comes_from_the_weights_unless_given(tmp_path):
    assert resolve_config(overrides={"init_from": "vgg16"}).arch is None
    assert resolve_config("best", overrides={"init_from": "vgg16"}).fc_width is None  # a recipe's value is not given
    given = resolve_config(overrides={"init_from": "vgg16", "arch": "vgg16", "batch_norm": False})
    assert (given.arch, given.batch_norm, given.fc_width) == ("vgg16", False, None)
    assert resolve_config().arch == "1x32,2x64,2x128"  # without initial weights: as before


def test_init_names_weights_and_init_scheme_the_initialisation(tmp_path):
    args = build_parser().parse_args(["train", "--init", "vgg16", "--init-scheme", "xavier", "--freeze", "features"])
    assert (args.init_from, args.init, args.freeze) == ("vgg16", "xavier", "features")
    old = tmp_path / "old.toml"
    old.write_text('[train]\ninit = "xavier"\n')  # a config written before --init named weights
    config = resolve_config(file=old)
    assert (config.init, config.init_from) == ("xavier", None)


@pytest.mark.parametrize("flags, message", [
    (["--init", "no-such-weights"], "no weights at no-such-weights"),
    (["--init", "{pth}", "--freeze", "3"], "freeze takes a number of blocks from 0 to 2"),
    (["--init", "{pth}", "--freeze", "some"], "expected a number of blocks or 'features'"),
    (["--init", "{pth}", "--arch", "1x8,1x32"], "the initial weights have arch 1x8,1x16, not 1x8,1x32"),
    (["--init", "{pth}", "--head-pool", "max"], "invalid choice: 'max'"),
    (["--init", "xavier"], "use --init-scheme xavier"),
    (["--init", "{not_vgg}"], "found (first key: 'encoder.weight')"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, standard_pth, capsys, flags, message):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "not_vgg.pth")
    files = {"pth": standard_pth[0], "not_vgg": tmp_path / "not_vgg.pth"}
    flags = [flag.format(**files) for flag in flags]
    assert train_cli(tmp_path, "bad", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vggkit: error:") and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_the_guide_head_api_snippet_runs_as_written(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()
    code = readme.split("## The head API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    model = vggkit.VGG("1x32,2x64,2x128", in_channels=1, input_size=28, fc_width=256, batch_norm=True)
    save_checkpoint(tmp_path / "runs" / "base" / "checkpoints" / "best", model, {"classes": list("abcdefghij")})
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "docs/guide.md (The head API)", "exec"), namespace)
    assert namespace["features"].shape == (4, 128, 3, 3) and namespace["embedding"].shape == (4, 256)
    assert namespace["model"].num_classes == 5 and namespace["model"].frozen_blocks == 2


@pytest.mark.slow
def test_imagenet_weights_bring_their_normalisation_and_a_lower_rate_for_their_blocks(tmp_path, capsys):
    from vggkit.optim import make_optimizer, set_lr

    path = tmp_path / "imagenet.pth"  # standard layout, 3 channels, 1000 classes: taken as ImageNet weights
    torch.save(vggkit.to_standard(source_model(num_classes=1000)), path)
    assert train_cli(tmp_path, "imagenet", "--init", str(path)) == 0
    out = capsys.readouterr().out
    assert "; pretrained blocks at 0.1 x lr;" in out
    run = tmp_path / "runs" / "imagenet"
    meta = read_meta(run / "checkpoints" / "best" / "model.safetensors")
    # the sample is gray: ImageNet's statistics averaged, as the first convolution was summed over RGB
    assert meta["mean"] == [pytest.approx(sum(vggkit.IMAGENET_MEAN) / 3)]
    assert meta["std"] == [pytest.approx(sum(vggkit.IMAGENET_STD) / 3)]
    assert tomllib.loads((run / "config.toml").read_text())["train"]["backbone_lr"] == 0.1

    config = resolve_config(overrides={"backbone_lr": 0.1, "lr": 0.5})
    model = vggkit.VGG(ARCH, in_channels=1, num_classes=10, input_size=28, fc_width=32, batch_norm=True)
    optimizer = make_optimizer(config, model)
    set_lr(optimizer, 0.5)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(rates[id(p)] == pytest.approx(0.05) for p in model.features.parameters())
    assert {rates[id(p)] for p in model.classifier.parameters()} == {0.5}
