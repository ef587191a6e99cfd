"""`vggkit evaluate` on a run trained on a drawn image folder: the held-out test and validation
splits made again from the run's config, any folder of class sub-folders, top-5, the misclassified grid."""
import importlib
import json
import shutil
import tomllib

import numpy as np
import tomli_w
import pytest
import torch
from PIL import Image

from vggkit.checkpoint import read_meta, save_checkpoint
from vggkit.cli import main
from vggkit.config import load_config
from vggkit.data import load_data
from vggkit.errors import VggkitError
from vggkit.evaluate import evaluate, format_report
from vggkit.model import VGG
from vggkit.predict import predict
from vggkit.preprocess import preprocess_meta
from vggkit.train import train

CLASSES = ["a", "b", "c", "d", "e", "f", "g"]  # more than 5: top-5 is reported


def draw(label: int, h: int, w: int, rng) -> np.ndarray:
    """A bright bar whose position tells the class, plus noise."""
    image = rng.integers(0, 60, (h, w), dtype=np.uint8)
    row = int((label + 0.5) * h / len(CLASSES))
    image[max(row - 1, 0):row + 1] = 230
    return image


def drawn_folder(root, per_class=10, sizes=((14, 14),), classes=CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(draw(CLASSES.index(name), h, w, rng)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained on a flat folder (no train/ test/ trees): 70 images, 7 held out for test, 7 for validation."""
    root = tmp_path_factory.mktemp("evaluate")
    folder = drawn_folder(root / "drawn")
    history = train({"data": str(folder), "arch": "1x8", "input_size": 14, "fc_width": 16, "epochs": 3,
                     "batch_size": 8, "lr": 0.05, "precision": "fp32", "device": "cpu", "flip": False,
                     "crop_padding": 0, "threads": 2, "out": str(root), "name": "run"},
                    progress="none", log=lambda *a: None)
    return history.run_dir, folder


@pytest.mark.slow
def test_test_split_is_the_runs_held_out_split(run):
    run_dir, folder = run
    result = evaluate(run_dir, log=lambda *a: None)
    held_out = load_data(str(folder), seed=0, log=lambda *a: None).test
    assert result["split"] == "test" and result["count"] == len(held_out) == 7
    # the best checkpoint recorded its test accuracy on the images the run held out: the same figure
    best = read_meta(run_dir)
    assert result["acc"] == pytest.approx(best["test_acc"], abs=1e-9) and result["test_acc"] == result["acc"]
    assert 0 <= result["acc"] <= result["top5_acc"] <= 1
    assert sum(sum(row) for row in result["confusion"]) == 7 and set(result["per_class"]) == set(CLASSES)
    assert {m["path"] for m in result["misclassified"]} <= set(held_out.paths)
    out = run_dir / "checkpoints" / "best" / "evaluation"
    assert result["out_dir"] == str(out) and (out / "confusion.png").is_file() and (out / "misclassified.png").is_file()


def test_val_split(run):
    run_dir, _ = run
    result = evaluate(run_dir, split="val", log=lambda *a: None)
    val_size = load_config(run_dir / "config.toml").val_size  # decided from the data: 10% of the 63 left after test
    assert result["split"] == "val" and result["count"] == val_size == 6 and "test_acc" not in result
    assert result["acc"] == pytest.approx(read_meta(run_dir)["val_acc"], abs=1e-9)
    assert result["out_dir"].endswith("evaluation-val")


@pytest.mark.slow
def test_predict_on_the_held_out_images_agrees_with_evaluate(run):
    run_dir, folder = run
    result = evaluate(run_dir, log=lambda *a: None)
    held_out = load_data(str(folder), seed=0, log=lambda *a: None).test
    predicted = predict(run_dir, held_out.paths, top_k=1, device="cpu")
    assert [CLASSES.index(p["top"][0]["class"]) for p in predicted] == result["predictions"]


@pytest.mark.slow
def test_any_folder_of_class_sub_folders(run, tmp_path):
    run_dir, _ = run
    # some of the classes, other sizes: fitted to the run's images as training images are
    other = drawn_folder(tmp_path / "new", per_class=3, sizes=((20, 20), (28, 14), (10, 10)), classes=CLASSES[:4],
                         seed=1)
    logged = []
    result = evaluate(run_dir, data=str(other), log=logged.append)
    assert result["split"] == str(other) and result["count"] == 12
    assert result["per_class"]["g"] is None and result["per_class"]["a"] is not None
    assert "  g  (no images)" in format_report(result).splitlines()
    assert np.array(result["confusion"])[4:].sum() == 0
    assert result["out_dir"].endswith("evaluation-new") and any("centre-cropped" in line for line in logged)
    assert {m["path"] for m in result["misclassified"]} <= {str(p) for p in other.rglob("*.png")}
    assert evaluate(run_dir, data=str(other), test_limit=4, log=lambda *a: None)["count"] == 4


def untrained_weights(directory, classes):
    """A checkpoint outside any run (evaluate takes its data from --data), untrained: it gets many wrong."""
    torch.manual_seed(0)
    model = VGG("1x8", in_channels=1, num_classes=len(classes), input_size=14, fc_width=16)
    meta = {"classes": classes, "mean": [0.2], "std": [0.3], "input_size": 14, "dataset": "drawn",
            "is_sample": False, **preprocess_meta((14, 14))}
    save_checkpoint(directory, model, meta)
    return directory


def test_top5_only_with_more_than_five_classes(tmp_path):
    folder = drawn_folder(tmp_path / "three", per_class=2, classes=CLASSES[:3])
    result = evaluate(untrained_weights(tmp_path / "weights", CLASSES[:3]), data=str(folder), log=lambda *a: None)
    assert result["top5_acc"] is None and result["count"] == 6 and "top-5" not in format_report(result)


@pytest.mark.slow
def test_misclassified_grid_names_true_and_predicted_class_and_confidence(tmp_path, monkeypatch):
    plots = importlib.import_module("vggkit.plots")  # every figure is written through plots.write_png
    titles = {}

    def capture(path, write):
        titles[path.name] = [ax.get_title() for ax in plots.pyplot().gcf().axes if ax.get_title()]

    monkeypatch.setattr(plots, "atomic_write", capture)
    folder = drawn_folder(tmp_path / "drawn", per_class=2)
    result = evaluate(untrained_weights(tmp_path / "weights", CLASSES), data=str(folder), log=lambda *a: None)
    wrong = result["misclassified"]
    assert len(wrong) == 14 - round(result["acc"] * 14) > 1 and len(titles["misclassified.png"]) == len(wrong)
    first = wrong[0]
    assert titles["misclassified.png"][0] == f"true {first['true']}\n→ {first['predicted']} {first['confidence']:.0%}"
    assert [m["confidence"] for m in wrong] == sorted((m["confidence"] for m in wrong), reverse=True)  # surest first
    assert all(m["path"].startswith(str(folder)) for m in wrong)


@pytest.mark.slow
def test_cli_evaluate(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(["evaluate", str(run_dir), "--split", "val", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "val" and out["count"] == 6 and "predictions" not in out  # 10% of the 63 left after test
    other = drawn_folder(tmp_path / "more", per_class=2)
    assert main(["evaluate", str(run_dir), "--data", str(other)]) == 0
    text = capsys.readouterr().out
    assert f"{other}: accuracy" in text and "(14 images)" in text and "top-5 accuracy" in text


@pytest.mark.parametrize("case, needle", [
    ("stranger", "sub-folders zebra are not classes of the model"),
    ("trees", "give one of its trees, e.g."),
    ("split-and-folder", "drop one of them"),
    ("no-val", "has no val split"),
])
def test_cli_evaluate_bad_input(run, tmp_path, capsys, case, needle):
    run_dir, folder = run
    args = ["evaluate", str(run_dir)]
    if case == "stranger":
        drawn_folder(tmp_path / "z", per_class=1, classes=["a"])
        (tmp_path / "z" / "zebra").mkdir()
        args += ["--data", str(tmp_path / "z")]
    elif case == "trees":
        drawn_folder(tmp_path / "t" / "train", per_class=1, classes=["a"])
        drawn_folder(tmp_path / "t" / "test", per_class=1, classes=["a"])
        args += ["--data", str(tmp_path / "t")]
    elif case == "split-and-folder":
        args += ["--data", str(folder), "--split", "test"]
    else:
        weights = tmp_path / "weights"
        shutil.copytree(run_dir / "checkpoints" / "best", weights)
        config = tomllib.loads((run_dir / "config.toml").read_text())
        config["train"]["val_size"] = 0  # a complete run config (partial ones are refused) without validation
        (tmp_path / "config.toml").write_text(tomli_w.dumps(config))
        args = ["evaluate", str(weights), "--split", "val"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("vggkit: error:")
