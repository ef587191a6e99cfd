"""`vggkit predict` on files and folders: recursive and sorted, in batches, to text, JSON and CSV,
with unreadable files listed (exit 2) or skipped."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.checkpoint import save_checkpoint
from vggkit.cli import main
from vggkit.errors import VggkitError
from vggkit.model import VGG
from vggkit.predict import image_paths, iter_predictions, predict, predict_logits
from vggkit.preprocess import preprocess_meta

CLASSES = ["ant", "bee", "cat", "dog"]


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(1)
    model = VGG("1x8", in_channels=3, num_classes=len(CLASSES), input_size=12, fc_width=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from the init: the images get different answers
    meta = {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 12, "dataset": "drawn",
            "is_sample": False, **preprocess_meta((12, 12))}
    save_checkpoint(tmp_path / "weights", model, meta)
    return tmp_path / "weights"


@pytest.fixture
def tree(tmp_path):
    """Images in nested folders, of several formats and sizes, beside files that are not images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    names = ["b.png", "a.jpg", "sub/c.bmp", "sub/deeper/d.webp", "sub/e.tiff", "z/f.png", "z/g.PNG"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10 + i, 16 - i, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_folders_are_searched_recursively_and_sorted(tree):
    found = [p.relative_to(tree).as_posix() for p in image_paths([tree])]
    assert found == ["a.jpg", "b.png", "sub/c.bmp", "sub/deeper/d.webp", "sub/e.tiff", "z/f.png", "z/g.PNG"]
    # files as given, in the given order, then a folder's images
    mixed = image_paths([tree / "z" / "f.png", tree / "sub"])
    assert [p.name for p in mixed] == ["f.png", "c.bmp", "d.webp", "e.tiff"]


def test_batches_give_the_same_answers(weights, tree):
    one_batch, _ = predict_logits(weights, [tree], device="cpu")
    in_threes, _ = predict_logits(weights, [tree], device="cpu", batch_size=3)
    assert one_batch.shape == (7, 4) and torch.allclose(one_batch, in_threes, rtol=1e-5, atol=1e-5)
    results = predict(weights, [tree], top_k=2, device="cpu", batch_size=2)
    assert [r["top"][0]["index"] for r in results] == one_batch.argmax(1).tolist()
    assert len({r["top"][0]["class"] for r in results}) > 1


def test_cli_csv_has_one_row_per_image(weights, tree, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(weights), str(tree), str(tree / "b.png"), "--csv", str(out), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (8 images)"
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    assert len(rows) == 9 and rows[1][0] == str(tree / "a.jpg") and rows[-1][0] == str(tree / "b.png")
    assert all(r[1] in CLASSES and 0 <= float(r[2]) <= 1 and float(r[2]) >= float(r[4]) for r in rows[1:])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_cli_text_and_json(weights, tree, capsys):
    assert main(["predict", str(weights), str(tree / "sub")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{tree / 'sub' / 'c.bmp'}: ")
    assert main(["predict", str(weights), str(tree), "--json", "--top-k", "9"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 7 and all(len(r["top"]) == 4 for r in results)
    assert sum(t["probability"] for t in results[0]["top"]) == pytest.approx(1, abs=1e-5)


def test_unreadable_files_are_listed_or_skipped(weights, tree, tmp_path, capsys):
    (tree / "sub" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tree / "z" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "p.csv"
    assert main(["predict", str(weights), str(tree), "--csv", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 unreadable images" in err and "broken.png" in err and "empty.jpg" in err
    assert "--skip-bad" in err and not out.exists()  # nothing half-written
    assert main(["predict", str(weights), str(tree), "--csv", str(out), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 unreadable image(s)" in captured.err and len(out.read_text().splitlines()) == 8


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("empty-folder", "holds no PNG/JPEG/BMP/WebP/TIFF images"),
    ("csv-dir", "does not exist; create it"),
])
def test_cli_bad_input(weights, tmp_path, capsys, case, needle):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(image)
    args = {"missing": [str(tmp_path / "nope.png")], "empty-folder": [str((tmp_path / "empty")), str(image)],
            "csv-dir": [str(image), "--csv", str(tmp_path / "no" / "p.csv")]}[case]
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(weights), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_progress_bar_for_large_sets(weights, tree, capsys):
    list(iter_predictions(weights, [tree], device="cpu", batch_size=2, progress="bar"))
    err = capsys.readouterr().err
    assert "/7 [" in err and "image/s" in err  # a bar over the 7 images
    list(iter_predictions(weights, [tree], device="cpu", batch_size=2, progress="auto"))  # not a TTY: quiet
    assert capsys.readouterr().err == ""
    with pytest.raises(VggkitError, match="top-k must be at least 1"):
        predict(weights, [tree], top_k=0)
