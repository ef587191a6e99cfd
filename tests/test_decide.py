"""What `vggkit train` decides from the data (decide.py): a table over data of many shapes, the values a
flag, file or recipe gives kept, runs that cannot make a step refused in one line; then no-flag runs on
small folders the tests draw."""
import argparse
import dataclasses
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vggkit import evaluate
from vggkit.cli import add_train_args, build_parser, main, train_flag
from vggkit.config import FROM_THE_DATA, TrainConfig, resolve_config
from vggkit.data import Dataset, DataSplits, load_data
from vggkit.data.carve import carve
from vggkit.decide import LIKE_FASHION_MNIST, DataFacts, decide
from vggkit.errors import VggkitError
from vggkit.train import train

SAMPLE = "fashion-mnist-sample"
KEYS = ("val_size", "input_size", "batch_size", "epochs", "flip")


def splits(name: str, n: int, h: int, w: int, channels: int = 1, flips_safe: bool = True, val: int = 0) -> DataSplits:
    """DataSplits as load_data(val_size=0) gives them, of n training images (their pixels unused)."""
    def images(count):
        return Dataset(np.empty((count, h, w, channels), np.uint8), np.arange(count) % 10, [str(i) for i in range(10)])

    return DataSplits(name, images(n), images(val), images(10), [str(i) for i in range(10)], "test", False,
                      (0.5,) * channels, (0.25,) * channels, flips_safe)


def decided(data, world_size=1, **given):
    config, notes = decide(TrainConfig(**given), data, world_size)
    return tuple(getattr(config, key) for key in KEYS), notes


@pytest.mark.parametrize("data,given,expected", [
    # Fashion-MNIST: the fast recipe's own values, so its accuracy and time stay
    (splits("fashion-mnist", 60_000, 28, 28), {}, (5000, 28, 256, 12, True)),
    (splits("mnist", 60_000, 28, 28, flips_safe=False), {}, (5000, 28, 256, 12, False)),
    (splits("cifar10", 50_000, 32, 32, 3), {}, (5000, 32, 256, 12, True)),
    # a named set made small by --limit: 10% of it for validation, a smaller batch, more epochs
    (splits("fashion-mnist", 60_000, 28, 28), {"limit": 2000}, (200, 28, 32, 17, True)),
    (splits("fashion-mnist", 60_000, 28, 28), {"limit": 200}, (20, 28, 8, 40, True)),
    (splits("fashion-mnist", 60_000, 28, 28), {"limit": 100}, (10, 28, 8, 40, True)),  # 12 steps: 84 epochs, capped
    # scikit-learn's digits as a folder (its held-out test split already taken): 8x8 upscaled, no flips
    (splits("digits/", 1617, 8, 8), {}, (161, 16, 32, 23, False)),
    # 162 RGB photos of mixed sizes, stored at the most common one: downscaled, batch 8
    (splits("photos/", 162, 200, 300, 3), {}, (16, 64, 8, 40, False)),
    (splits("wide/", 5000, 30, 40, 3), {}, (500, 40, 128, 29, False)),
    # tiny: one step an epoch, epochs capped
    (splits("tiny/", 12, 28, 28), {}, (1, 28, 8, 40, False)),
    # a val/ tree is the validation split, whatever its size
    (splits("trees/", 900, 28, 28, val=300), {}, (300, 28, 16, 18, False)),
    # what is given is kept
    (splits("digits/", 1617, 8, 8), {"input_size": 32, "batch_size": 64, "epochs": 3, "val_size": 0, "flip": True},
     (0, 32, 64, 3, True)),
    (splits("fashion-mnist", 60_000, 28, 28), {"arch": "vgg11"}, (5000, 64, 256, 12, True)),  # 5 blocks need 64
])
def test_the_table_of_decisions(data, given, expected):
    assert decided(data, **given)[0] == expected


@pytest.mark.parametrize("batch,lr", [(256, 0.1), (32, 0.0595), (8, 0.042)])
def test_the_learning_rate_scales_with_the_fourth_root_of_the_batch(batch, lr):
    config, _ = decide(TrainConfig(batch_size=batch), splits("fashion-mnist", 60_000, 28, 28))
    assert config.lr == lr
    assert decide(TrainConfig(batch_size=batch, lr=0.5), splits("fashion-mnist", 60_000, 28, 28))[0].lr == 0.5  # given


def test_notes_say_why():
    _, notes = decided(splits("digits/", 1617, 8, 8))
    assert notes == {"val_size": "10%", "input_size": "8x8 images upscaled", "batch_size": "from the data",
                     "epochs": "from the data", "flip": "no flip: unknown data may not be flip-safe; --flip turns it on",
                     "lr": "0.1 x (32/256)**0.25"}
    _, notes = decided(splits("fashion-mnist", 60_000, 28, 28))
    assert notes["val_size"] == "10%, at most 5,000" and notes["input_size"] == "native"
    assert notes["flip"] == "fashion-mnist is flip-safe"
    assert decided(splits("mnist", 60_000, 28, 28, flips_safe=False))[1]["flip"] == "no flip: mnist is not flip-safe"
    assert decided(splits("photos/", 162, 200, 300, 3))[1]["input_size"] == "300x200 images downscaled"
    assert decided(splits("trees/", 900, 28, 28, val=300), val_size=50)[1]["val_size"] == \
        "the val/ folder; val_size ignored"
    assert decided(splits("f/", 9, 28, 28), batch_size=4)[1]["val_size"] == "too few images to hold some out"


@pytest.mark.parametrize("data,given,tta", [
    (splits("fashion-mnist", 60_000, 28, 28), {}, "flip"),  # trains with flips: the closing report mirrors too
    (splits("mnist", 60_000, 28, 28, flips_safe=False), {}, "off"),
    (splits("digits/", 1617, 8, 8), {}, "off"),
    (splits("digits/", 1617, 8, 8), {"flip": True}, "flip"),
    (splits("fashion-mnist", 60_000, 28, 28), {"tta": "off"}, "off"),  # what is given is kept
    (splits("fashion-mnist", 60_000, 28, 28), {"flip": False, "tta": "translate"}, "translate"),
])
def test_test_time_augmentation_follows_the_flips(data, given, tta):
    assert decide(TrainConfig(**given), data)[0].tta == tta


def test_an_image_folder_gets_no_flips_though_its_splits_do_not_say_so():
    folder = splits("cifar10/", 1000, 32, 32, 3, flips_safe=True)  # a folder that happens to be called cifar10/
    assert decided(folder)[0][4] is False


def test_the_recipes_keep_their_values():
    fashion = splits("fashion-mnist", 60_000, 28, 28)
    d2l, notes = decide(resolve_config("d2l"), fashion)
    assert d2l == dataclasses.replace(resolve_config("d2l"))  # all five given by the recipe
    assert notes == {"input_size": "configured; 28x28 images"}
    best, _ = decide(resolve_config("best"), fashion)
    assert (best.val_size, best.input_size, best.batch_size, best.epochs, best.flip) == (5000, 28, 128, 40, True)


def test_the_fast_recipe_on_fashion_mnist_is_what_bench_assumes():
    config, _ = decide(TrainConfig(), LIKE_FASHION_MNIST)
    assert tuple(getattr(config, key) for key in KEYS) == (5000, 28, 256, 12, True)
    assert set(FROM_THE_DATA) == {*KEYS, "lr", "tta"} and config.lr == 0.1 and config.tta == "flip"


def test_a_batch_is_shared_evenly_among_processes():
    assert decided(splits("fashion-mnist", 60_000, 28, 28), world_size=3)[0][2] == 255
    assert decided(splits("digits/", 1617, 8, 8), world_size=4)[0][2] == 32


@pytest.mark.parametrize("data,given,message", [
    (splits("fashion-mnist", 60_000, 28, 28), {"batch_size": 1_000_000},
     "batch size 1,000,000 is more than the 55,000 training images of fashion-mnist, so an epoch would have no "
     "step; use --batch-size 32768 or less, or leave it out to decide it from the data"),
    (splits("fashion-mnist", 60_000, 28, 28), {"limit": 200, "batch_size": 256},
     "batch size 256 is more than the 200 training images"),
    (splits("small/", 7, 28, 28), {},
     "small/ has 7 training image(s), fewer than one batch of 8; add images, or give --batch-size 7"),
    (splits("small/", 12, 28, 28), {"limit": 5},
     "small/ has 5 training image(s) (of 12 before validation and --limit), fewer than one batch of 8"),
    (splits("fashion-mnist", 60_000, 28, 28), {"val_size": 60_000},
     "val_size 60,000 leaves no training images (fashion-mnist has 60,000)"),
])
def test_no_epoch_without_a_step(data, given, message):
    with pytest.raises(VggkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decide(TrainConfig(**given), data)


def test_a_last_short_batch_is_a_step():
    config, _ = decide(TrainConfig(batch_size=500, drop_last=False), splits("small/", 100, 28, 28))
    assert config.batch_size == 500


def test_carving_draws_what_load_data_draws():
    whole = load_data(SAMPLE, val_size=0, seed=3, log=lambda *a: None)
    for val_size, limit in ((500, None), (200, 1000), (0, 300)):
        carved = carve(whole, val_size, limit, seed=3)
        loaded = load_data(SAMPLE, val_size=val_size, limit=limit, seed=3, log=lambda *a: None)
        for split in ("train", "val"):
            assert np.array_equal(getattr(carved, split).images, getattr(loaded, split).images), (val_size, limit)
            assert np.array_equal(getattr(carved, split).labels, getattr(loaded, split).labels)
        assert (carved.mean, carved.std) == (loaded.mean, loaded.std)
    with pytest.raises(VggkitError, match="limit must be a positive integer, got 0"):
        carve(whole, 10, 0, seed=3)


def test_facts_of_loaded_splits():
    facts = DataFacts.of(splits("photos/", 162, 200, 300, 3, val=20))
    assert facts == DataFacts("photos/", 162, 20, 200, 300, known=False, flips_safe=False, channels=3,
                              class_counts=(17, 17) + (16,) * 8)  # the training images of each class


# ---------------------------------------------------------------------------------------------
# No-flag runs on folders the tests draw

SHAPES = ("ring", "square", "cross")


def draw(shape: str, rng: np.random.Generator, size: int = 12) -> Image.Image:
    """A white shape of random size and place on a dark, noisy square."""
    noise = rng.integers(0, 60, (size, size), dtype=np.uint8)
    image = Image.fromarray(noise, mode="L")
    pen = ImageDraw.Draw(image)
    r = int(rng.integers(3, 5))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "ring":
        pen.ellipse(box, outline=255)
    elif shape == "square":
        pen.rectangle(box, outline=255)
    else:
        pen.line(box, fill=255)
        pen.line((cx - r, cy + r, cx + r, cy - r), fill=255)
    return image


def shapes_folder(root, per_class: int, test_per_class: int = 0, seed: int = 0):
    """root/<shape>/*.png, or root/train/<shape>/ and root/test/<shape>/ with test_per_class held out."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        for i in range(per_class + test_per_class):
            tree = root / ("test" if i >= per_class else "train") / shape if test_per_class else root / shape
            tree.mkdir(parents=True, exist_ok=True)
            draw(shape, rng).save(tree / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_no_data_flags_on_a_small_folder_reach_the_stated_accuracy_and_say_what_they_decided(tmp_path):
    data = shapes_folder(tmp_path / "shapes", per_class=20, test_per_class=10)
    lines = []
    small_network = {"arch": "1x8,1x16", "fc_width": 32}  # for the test's time; nothing about the data
    history = train({"data": str(data), "out": str(tmp_path / "runs"), "name": "run", "threads": 1, **small_network},
                    progress="none", log=lines.append)
    assert lines[1] == ("data: train 54, val 6 (10%), test 30 images; input 16x16 (12x12 images upscaled); "
                        "batch 8 (from the data), lr 0.042 (0.1 x (8/256)**0.25), 6 steps per epoch, 40 epochs (from the data); "
                        "augment: crop 2 "
                        "(no flip: unknown data may not be flip-safe; --flip turns it on)")
    best = history.best
    assert best["test_acc"] >= 0.9, history.epochs[-1]  # 30 held-out images
    assert lines[-3].startswith(f"best checkpoint (what evaluate, predict and export use): epoch {best['epoch']} of 40")
    saved = (tmp_path / "runs" / "run" / "config.toml").read_text()
    assert all(line in saved for line in ("input_size = 16", "batch_size = 8", "epochs = 40", "val_size = 6",
                                          "flip = false"))
    # the closing line's figure is the best checkpoint's, as evaluate finds it
    one_image = 1 / 30 + 1e-9  # bf16 in other batch sizes may turn one
    tested = evaluate(tmp_path / "runs" / "run", log=lambda *a: None)["test_acc"]
    assert tested == pytest.approx(best["test_acc"], abs=one_image)


def test_a_folder_smaller_than_a_batch_trains_with_a_smaller_one_or_is_refused_in_one_line(tmp_path, capsys):
    few = shapes_folder(tmp_path / "few", per_class=4)
    history = train({"data": str(few), "out": str(tmp_path / "runs"), "name": "few", "threads": 1, "epochs": 2,
                     "arch": "1x8", "fc_width": 16}, progress="none", log=lambda *a: None)
    assert len(history.epochs) == 2 and history.epochs[0]["train_acc"] > 0  # 8 to 11 images: batch 8, one step
    too_few = shapes_folder(tmp_path / "too-few", per_class=2)
    assert main(["train", "--data", str(too_few), "--out", str(tmp_path / "runs"), "--name", "too-few"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"vggkit: error: {too_few} has (\d) training image\(s\), fewer than one batch of 8; "
                        r"add images, or give --batch-size \1\n", err), err
    assert not (tmp_path / "runs" / "too-few").exists()  # nothing written before the data was checked


@pytest.mark.slow
def test_the_best_checkpoint_is_tested_at_the_end_when_the_epochs_were_not(tmp_path):
    data = shapes_folder(tmp_path / "shapes", per_class=10, test_per_class=4)
    history = train({"data": str(data), "out": str(tmp_path), "name": "run", "threads": 1, "epochs": 3, "arch": "1x8",
                     "fc_width": 16, "precision": "fp32", "eval_every_epoch_on_test": False}, progress="none",
                    log=lambda *a: None)
    assert all("test_acc" not in row for row in history.epochs)
    assert history.best["test_acc"] == pytest.approx(evaluate(tmp_path / "run", log=lambda *a: None)["test_acc"])


def test_help_shows_every_train_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        if field.name != "preset":
            assert train_flag(field.name) in text
    assert "--epochs EPOCHS passes over the training set (default: from the data, 12, more for small sets; d2l: 10; " \
           "best: 40)" in text
    assert "--lr LR learning rate (peak for onecycle) (default: from the data, 0.1 at batch 256, x (batch/256)**0.25 " \
           "for other batches; d2l: 0.05; best: 0.05)" in text
    assert "(default: from the data, 10%, at most 5,000; d2l: 0)" in text
    assert "(default: from the data, flip where the run trains with flips, else off; d2l: off; best: flip)" in text
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    for action in parser._actions[1:]:  # after --help
        assert "default" in action.help, action.option_strings


def test_version(capsys):
    from vggkit import __version__

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"vggkit {__version__}\n"


@pytest.mark.parametrize("height,width,size,pooled", [(2000, 3000, 224, "adaptive"), (375, 500, 224, "adaptive"),
                                                      (200, 300, 160, "adaptive"), (130, 140, 112, "adaptive")])
def test_photos_train_at_vggs_224_where_their_centre_crop_allows_it(height, width, size, pooled):
    photos = DataFacts("photos/", 300, 0, height, width, known=False, flips_safe=False, photos=True)
    config, notes = decide(resolve_config(), photos)
    assert config.input_size == size and config.flip is True and config.head_pool == pooled
    assert notes["input_size"].startswith(f"photos, {width}x{height} median")
    assert notes["flip"].startswith("photos are flip-safe") and "7x7" in notes["head_pool"]
    given = decide(resolve_config(overrides={"input_size": 64, "arch": "2x8,2x8,2x8,2x8,2x8"}), photos)[0]
    assert given.input_size == 64 and given.head_pool is None  # a 2x2 map: nothing to average
    assert decide(resolve_config(), LIKE_FASHION_MNIST)[0].head_pool is None  # in-memory data as before


def test_initial_weights_train_their_blocks_at_a_tenth_of_the_rate():
    weights = dataclasses.replace(resolve_config(overrides={"init_from": "vgg16"}), arch="1x8,1x16", ratio=1)
    config, notes = decide(weights, LIKE_FASHION_MNIST)
    assert config.backbone_lr == 0.1 and notes["backbone_lr"] == "pretrained blocks at 0.1 x lr"
    assert decide(resolve_config(), LIKE_FASHION_MNIST)[0].backbone_lr is None  # one rate for all
    given = dataclasses.replace(resolve_config(overrides={"init_from": "vgg16", "backbone_lr": 1.0}), arch="1x8", ratio=1)
    assert decide(given, LIKE_FASHION_MNIST)[0].backbone_lr == 1.0
