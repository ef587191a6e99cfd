"""Training recipes (config.RECIPES): TrainConfig's own defaults are the default recipe `fast`, and the
other recipes resolve field by field to what they resolved to before recipes and architecture
presets were separated."""
import dataclasses

import pytest

from vggkit import PRESETS as ARCHITECTURES
from vggkit.cli import build_parser
from vggkit.config import DEFAULT_RECIPE, RECIPES, TrainConfig, resolve_config
from vggkit.errors import VggkitError

# Everything but the recipe fields is TrainConfig's default (data, speed and run settings).
COMMON = dict(data="fashion-mnist", data_dir=None, limit=None, test_limit=None, skip_bad=False, allow_sample=True,
              warmup=0.2, device="auto", precision="auto", channels_last="auto", compile="auto", allocator="auto",
              kernels="fast", threads=None, seed=0, out="runs", name=None, eval_every_epoch_on_test=True,
              init_from=None, freeze=0, head_pool=None, tensorboard=False, ema=0.0, ema_every=1, streaming="auto",
              workers=None, backbone_lr=None)
# None: decided from the data (decide.py; on Fashion-MNIST 28, val 5,000, flip on, 8 epochs, batch 256)
FAST = dict(COMMON, preset="fast", arch="1x32,2x64,2x128", ratio=1, input_size=None, fc_width=256, dropout=0.0,
            batch_norm=True, init="kaiming", val_size=None, normalize=True, crop_padding=2, flip=None, erasing=0.0,
            epochs=None, batch_size=None, lr=None, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="onecycle", label_smoothing=0.1, drop_last=True, tta=None, balance="auto")
D2L = dict(COMMON, preset="d2l", arch="d2l-vgg11", ratio=4, input_size=224, fc_width=4096, dropout=0.5,
           batch_norm=False, init="xavier", val_size=0, normalize=False, crop_padding=0, flip=False, erasing=0.0,
           epochs=10, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0,
           schedule="none", label_smoothing=0.0, drop_last=False, tta="off", balance="off")
BEST = dict(COMMON, preset="best", arch="2x64,2x128,3x256", ratio=1, input_size=28, fc_width=512, dropout=0.3,
            batch_norm=True, init="kaiming", val_size=None, normalize=True, crop_padding=2, flip=True, erasing=0.25,
            epochs=40, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="onecycle", label_smoothing=0.1, drop_last=True, tta="flip", balance="auto")


def test_the_dataclass_defaults_are_the_default_recipe():
    assert DEFAULT_RECIPE == "fast"
    assert TrainConfig() == resolve_config() == resolve_config("fast")
    assert dataclasses.asdict(TrainConfig()) == FAST


@pytest.mark.parametrize("name,expected", [("fast", FAST), ("d2l", D2L), ("best", BEST)])
def test_each_recipe_resolves_field_by_field(name, expected):
    assert set(RECIPES) == {"fast", "d2l", "best"}
    resolved = dataclasses.asdict(resolve_config(name))
    assert resolved.keys() == expected.keys()
    for key, value in expected.items():
        assert resolved[key] == value, (name, key)


def test_file_and_flags_override_the_recipe(tmp_path):
    toml = tmp_path / "my.toml"
    toml.write_text('[train]\npreset = "d2l"\nepochs = 3\nlr = 0.02\n')
    config = resolve_config(file=toml, overrides={"lr": 0.01, "flip": None})
    assert (config.preset, config.arch, config.epochs, config.lr, config.flip) == ("d2l", "d2l-vgg11", 3, 0.01, False)


def test_an_unknown_recipe_names_the_choices():
    with pytest.raises(VggkitError, match="unknown preset 'huge'; choose one of fast, d2l, best"):
        resolve_config("huge")


def test_recipes_and_architecture_presets_are_apart():
    assert not set(RECIPES) & set(ARCHITECTURES)
    assert "vgg16" in ARCHITECTURES and "fast" not in ARCHITECTURES


@pytest.mark.parametrize("command", ["train", "bench"])
def test_the_cli_offers_the_recipes(command):
    parser = build_parser()
    for name in RECIPES:
        assert parser.parse_args([command, "--preset", name]).preset == name
    with pytest.raises(VggkitError, match="invalid choice"):
        parser.parse_args([command, "--preset", "vgg16"])
