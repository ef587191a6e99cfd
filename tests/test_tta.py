"""Test-time augmentation: the views themselves, the mean of the logits, `evaluate(tta=...)` and
`vggkit evaluate --tta`, and `train --tta`'s labelled figure in the final report (tiny runs on the
bundled sample and on a drawn, not flip-safe folder)."""
import json
from pathlib import Path
import tomllib

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image
from torch import nn

from helpers import like_trained
from vggkit.cli import main
from vggkit.config import load_config, resolve_config
from vggkit.data import Dataset
from vggkit.errors import VggkitError
from vggkit.evaluate import evaluate
from vggkit.model import VGG
from vggkit.pipeline import BatchLoader
from vggkit.runtime import Speed
from vggkit.steps import evaluate_loader
from vggkit.train import train
from vggkit.tta import (STRONGEST, TTA_LEVELS, black_after_preprocessing, check_level, flip_safety, tta_logits,
                        tta_plan, view)

SAMPLE = "fashion-mnist-sample"
TEST_LIMIT = 200
QUIET = dict(log=lambda *a: None)
FP32 = Speed(None, channels_last=False, compile=False)


def batch(n=3, c=2, h=5, w=6, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The views

def test_flip_of_flip_is_identity_and_flip_mirrors_left_right():
    x = batch()
    assert torch.equal(view(view(x, "flip"), "flip"), x) and torch.equal(view(x, "identity"), x)
    assert torch.equal(view(x, "flip")[..., 0], x[..., -1])


def test_a_one_pixel_shift_moves_a_pixel_and_fills_the_uncovered_border():
    x = torch.zeros(1, 2, 4, 5)
    x[0, :, 2, 3] = 7.0
    fill = torch.tensor([-1.0, -2.0])  # one per channel: a black pixel after normalising
    down_right, up_left = view(x, "shift+1", fill), view(x, "shift-1", fill)
    assert down_right[0, 0, 3, 4] == 7 and up_left[0, 0, 1, 2] == 7
    assert (down_right[0, 1, 0] == -2).all() and (down_right[0, 1, :, 0] == -2).all()  # top row, left column
    assert (up_left[0, 0, -1] == -1).all() and (up_left[0, 0, :, -1] == -1).all()  # bottom row, right column
    assert (down_right[0, :, 1:, 1:] != 0).sum() == 2  # the rest is the image moved, nothing else
    both = view(x, "flip shift+1", fill)
    assert torch.equal(both, view(view(x, "flip"), "shift+1", fill)) and both[0, 0, 3, 2] == 7  # mirrored to column 1, then moved


def test_views_of_a_channels_last_batch_have_the_same_values():
    x = batch(c=3)
    for name in TTA_LEVELS[STRONGEST]:
        assert torch.equal(view(x.contiguous(memory_format=torch.channels_last), name, 0.5), view(x, name, 0.5))


def test_the_fill_is_a_black_pixel_after_the_loaders_preprocessing():
    images = np.zeros((4, 6, 6, 1), dtype=np.uint8)
    loader = BatchLoader(Dataset(images, np.arange(4) % 2, ["a", "b"]), 4, input_size=6, mean=(0.3,), std=(0.2,),
                         out_channels=3)
    x, _ = next(iter(loader))
    black = black_after_preprocessing(loader)
    assert black.shape == (3,) and torch.allclose(x[0, :, 0, 0], black) and black[0] == pytest.approx(-1.5)


# ---------------------------------------------------------------------------------------------
# The mean of the logits

def model(seed=0):
    torch.manual_seed(seed)
    return like_trained(VGG("1x4,1x8", in_channels=2, num_classes=5, input_size=8, fc_width=16), weight_noise=0.05)


def test_off_is_the_plain_forward_bit_for_bit():
    net, x = model(), batch(n=4, h=8, w=8)
    with torch.no_grad():
        assert torch.equal(tta_logits(net, x, TTA_LEVELS["off"]), net(x))


def test_tta_logits_are_the_mean_of_each_views_logits_however_grouped():
    net, x = model(), batch(n=4, h=8, w=8)
    views = TTA_LEVELS["flip-translate"]
    with torch.no_grad():
        expected = torch.stack([net(view(x, name, -0.5)) for name in views]).mean(0)
        for max_images in (None, 4, 8, 1000):  # one view per forward, two, all in one
            assert torch.allclose(tta_logits(net, x, views, -0.5, max_images), expected, atol=1e-5)
        assert tta_logits(net, x[:0], views).shape == (0, 5)  # an empty part of a distributed batch


def test_known_identity_logits_are_used_not_computed_again():
    net, x = model(), batch(n=4, h=8, w=8)
    views, seen = TTA_LEVELS["flip-translate"], []

    def counted(images):
        seen.append(len(images))
        return net(images)

    with torch.no_grad():
        identity = net(x)
        for max_images in (None, 4):
            assert torch.allclose(tta_logits(counted, x, views, -0.5, max_images, identity),
                                  tta_logits(net, x, views, -0.5, max_images), atol=1e-6)
        assert sum(seen) == 2 * (len(views) - 1) * len(x)
        assert tta_logits(counted, x, TTA_LEVELS["off"], identity=identity) is identity
        with pytest.raises(ValueError):
            tta_logits(net, x, views, identity=identity[:3])


class FlipInvariant(nn.Module):
    """g(x) + g(mirrored x): the same logits for an image and its mirror."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + self.inner(x.flip(3))


def test_a_flip_invariant_model_has_the_same_accuracy_with_flip_tta():
    net = FlipInvariant(model(seed=1)).eval()
    rng = np.random.default_rng(0)
    data = Dataset(rng.integers(0, 256, (40, 8, 8, 2), dtype=np.uint8), rng.integers(0, 5, 40), list("abcde"))
    loader = BatchLoader(data, 16, input_size=8)
    plain = evaluate_loader(net, loader, FP32, torch.device("cpu"))
    flipped = evaluate_loader(net, loader, FP32, torch.device("cpu"),
                              forward=lambda x: tta_logits(net, x, TTA_LEVELS["flip"]))
    assert flipped[1] == plain[1] and flipped[0] == pytest.approx(plain[0], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Levels and flip safety

def test_levels_leave_flips_out_where_the_data_is_not_flip_safe():
    assert tta_plan("flip-translate", True).views == TTA_LEVELS["flip-translate"] and len(TTA_LEVELS[STRONGEST]) == 6
    plan = tta_plan("flip-translate", False, "the run trained without flips")
    assert plan.views == ("identity", "shift+1", "shift-1") and plan.describe() == "translate, 3 views"
    assert plan.note == "TTA: flip views left out (the run trained without flips); using translate"
    assert tta_plan("flip", False).views == ("identity",) and not tta_plan("flip", False).active
    assert tta_plan("translate", False).note is None


def test_flip_safety_from_the_run_config_or_else_the_registry():
    assert flip_safety(True, "mnist")[0] and not flip_safety(False, "fashion-mnist")[0]
    assert flip_safety(None, "fashion-mnist")[0] and flip_safety(None, "mnist") == (False, "mnist is not flip-safe")
    assert not flip_safety(None, "my-folder")[0]


def test_a_bad_level_is_a_one_line_error(capsys):
    with pytest.raises(VggkitError, match="unknown TTA level 'flop'; choose off, flip, translate, flip-translate"):
        check_level("flop")
    with pytest.raises(VggkitError, match="tta must be one of off, flip"):
        resolve_config(overrides={"tta": "flop"})
    assert main(["train", "--tta", "flop"]) == 2
    assert "invalid choice: 'flop'" in capsys.readouterr().err


def test_a_run_config_saved_before_tta_loads_with_tta_off(tmp_path):
    from vggkit.config import save_config
    from vggkit.decide import LIKE_FASHION_MNIST, decide

    config, _ = decide(resolve_config(), LIKE_FASHION_MNIST)
    save_config(config, tmp_path / "config.toml")
    saved = tomllib.loads((tmp_path / "config.toml").read_text())
    del saved["train"]["tta"]
    (tmp_path / "config.toml").write_text(tomli_w.dumps(saved))
    assert load_config(tmp_path / "config.toml").tta == "off"


# ---------------------------------------------------------------------------------------------
# Runs: evaluate --tta, train --tta

TINY = dict(arch="1x8,1x16", input_size=28, fc_width=32, epochs=1, batch_size=100, lr=0.05, limit=500,
            test_limit=TEST_LIMIT, val_size=100, precision="fp32", crop_padding=2, threads=2)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """One epoch on the bundled sample (flip-safe, trained with flips), with train --tta."""
    root, lines = tmp_path_factory.mktemp("tta"), []
    history = train({**TINY, "data": SAMPLE, "flip": True, "tta": "flip-translate", "out": str(root), "name": "run"},
                    progress="none", log=lines.append)
    return history, lines


def evaluate_sample(run_dir, **kwargs):
    return evaluate(run_dir, data=SAMPLE, test_limit=TEST_LIMIT, device="cpu", **QUIET, **kwargs)


@pytest.mark.slow
def test_train_tta_labels_the_best_checkpoints_figure_in_the_closing_line(sample_run):
    history, lines = sample_run
    best = history.best
    closing = next(line for line in lines if line.startswith("best checkpoint"))
    assert closing.endswith(f"test acc {best['test_acc']:.4f}, with TTA (flip + translate, 6 views) "
                            f"{best['tta_test_acc']:.4f}")
    end = json.loads((history.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["best_checkpoint"]["tta_test_acc"] == best["tta_test_acc"] and end["best_checkpoint"]["epoch"] == 1
    # the same figure as evaluate --tta gives on the same test images
    assert evaluate_sample(history.run_dir, tta="flip-translate")["acc"] == pytest.approx(best["tta_test_acc"],
                                                                                           abs=1.5 / TEST_LIMIT)


@pytest.mark.slow
def test_tta_off_is_plain_evaluation_bit_for_bit(sample_run, tmp_path):
    run_dir = sample_run[0].run_dir
    plain, off = evaluate_sample(run_dir, out_dir=tmp_path), evaluate_sample(run_dir, out_dir=tmp_path, tta="off")
    assert plain == off and "tta" not in off


@pytest.mark.slow
def test_evaluate_tta_reports_its_views_and_its_figures_come_from_them(sample_run, tmp_path):
    run_dir = sample_run[0].run_dir
    result = evaluate_sample(run_dir, out_dir=tmp_path, tta="flip-translate")
    assert result["tta"]["views"] == list(TTA_LEVELS["flip-translate"])
    confusion = np.array(result["confusion"])
    assert confusion.sum() == TEST_LIMIT and np.trace(confusion) == round(result["acc"] * TEST_LIMIT)
    assert len(result["misclassified"]) == TEST_LIMIT - np.trace(confusion)


@pytest.mark.slow
def test_evaluate_tta_writes_its_plots_beside_the_plain_ones(sample_run):
    run_dir = sample_run[0].run_dir
    plain, flip = Path(evaluate_sample(run_dir)["out_dir"]), Path(evaluate_sample(run_dir, tta="flip")["out_dir"])
    assert flip == plain.with_name(plain.name + "-tta-flip")
    assert (plain / "confusion.png").is_file() and (flip / "confusion.png").is_file()


@pytest.mark.slow
def test_cli_evaluate_tta_prints_the_views_line_and_the_accuracy(sample_run, tmp_path, capsys):
    run_dir = sample_run[0].run_dir
    common = [str(run_dir), "--data", SAMPLE, "--limit", str(TEST_LIMIT), "--out", str(tmp_path)]
    assert main(["evaluate", *common, "--tta"]) == 0  # bare: the strongest
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("TTA: flip + translate, 6 views (identity, flip, shift+1, shift-1, flip shift+1, ")
    assert lines[1].startswith("test accuracy ") and f"({TEST_LIMIT} images)" in lines[1]
    assert main(["evaluate", *common, "--tta", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'bogus'" in err and len(err.splitlines()) == 1


def drawn_digits(root, per_class=12):
    """A digits-like folder: strokes whose side tells the class (a mirror would change it)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(["left", "right"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 40, (12, 12), dtype=np.uint8)
            image[2:10, 2 + 6 * label:4 + 6 * label] = 220
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_not_flip_safe_data_leaves_flip_out_with_a_note(tmp_path):
    lines = []
    history = train({**TINY, "data": str(drawn_digits(tmp_path / "digits")), "arch": "1x8", "input_size": 12,
                     "batch_size": 8, "limit": None, "test_limit": None, "val_size": None, "tta": "flip-translate",
                     "out": str(tmp_path), "name": "run"}, progress="none", log=lines.append)
    assert load_config(history.run_dir / "config.toml").flip is False  # decided: an image folder
    note = "TTA: flip views left out (the run trained without flips); using translate"
    assert note in lines and "with TTA (translate, 3 views)" in next(l for l in lines if l.startswith("best checkpoint"))
    logged = []
    result = evaluate(history.run_dir, out_dir=tmp_path / "e", tta="flip-translate", log=logged.append)
    assert note in logged and result["tta"]["views"] == ["identity", "shift+1", "shift-1"]
    only_flip = evaluate(history.run_dir, out_dir=tmp_path / "e", tta="flip", log=lambda *a: None)
    assert only_flip["tta"]["views"] == ["identity"]
    plain = evaluate(history.run_dir, out_dir=tmp_path / "e", **QUIET)
    assert only_flip["acc"] == plain["acc"] and only_flip["loss"] == plain["loss"]
