"""Names vggkit did not write, shown safely (untrusted.py): `predict --csv` neutralises cells a
spreadsheet would run as formulas (class names like =HYPERLINK(...), a file named =cmd|calc!A0.png)
with a leading ' as OWASP advises, numbers staying numbers; class and file names holding terminal
escapes or control characters are printed escaped, in results, notes and error lines alike."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.checkpoint import save_checkpoint
from vggkit.cli import main
from vggkit.evaluate import format_report
from vggkit.model import VGG
from vggkit.preprocess import preprocess_meta
from vggkit.untrusted import csv_cell, printable

ESC = "\x1b"
FORMULA_CLASSES = ['=HYPERLINK("http://example.com/x","click")', "+cmd|' /C calc'!A0", "-1", "@SUM(A1:A9)"]
ESCAPE_CLASSES = [f"{ESC}[31mred{ESC}[0m", f"{ESC}]0;owned\x07title", "tab\there", "right\u202eleft"]


@pytest.mark.parametrize("cell, written", [
    ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
    ("=1+1", "'=1+1"),
    ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"),
    ("\rx", "'\rx"),
    ("-1", "-1"),
    ("-0.5", "-0.5"),
    ("+3e2", "+3e2"),
    ("cat", "cat"),
    ("a=b", "a=b"),
    ("", ""),
    (0.25, 0.25),
])
def test_cells_a_spreadsheet_would_run_get_a_quote(cell, written):
    assert csv_cell(cell) == written


@pytest.mark.parametrize("text, shown", [
    (f"{ESC}[31mred", "\\x1b[31mred"),
    ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),
    ("bell\x07", "bell\\x07"),
    ("\x9bcsi", "\\x9bcsi"),
    ("right\u202eleft", "right\\u202eleft"),
    ("plain café 猫 name.png", "plain café 猫 name.png"),
])
def test_console_text_escapes_what_a_terminal_acts_on(text, shown):
    assert printable(text) == shown


def weights(folder, classes):
    torch.manual_seed(0)
    model = VGG("1x4", in_channels=1, num_classes=len(classes), input_size=8, fc_width=8)
    meta = {"classes": classes, "mean": [0.5], "std": [0.25], "input_size": 8, "dataset": "drawn", "is_sample": False,
            **preprocess_meta((8, 8))}
    save_checkpoint(folder / "weights", model, meta)
    return folder / "weights"


def image(path):
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path, format="PNG")
    return path


def files(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_predict_csv_writes_formulas_as_text(tmp_path, monkeypatch, capsys):
    model = weights(tmp_path, FORMULA_CLASSES)
    images = tmp_path / "images"
    images.mkdir()
    image(images / "=cmd|calc!A0.png")
    image(images / "plain.png")
    monkeypatch.chdir(images)
    before = files(tmp_path)
    code = main(["predict", str(model), "=cmd|calc!A0.png", "plain.png", "--top-k", "4", "--csv", "../out.csv"])
    assert (code, capsys.readouterr().err) == (0, "")
    assert files(tmp_path) == before | {tmp_path / "out.csv": (tmp_path / "out.csv").read_bytes()}
    header, *rows = list(csv.reader((tmp_path / "out.csv").open(newline="")))
    assert header[:3] == ["path", "class_1", "probability_1"]
    assert [row[0] for row in rows] == ["'=cmd|calc!A0.png", "plain.png"]
    for row in rows:
        classes, probabilities = row[1::2], row[2::2]
        assert sorted(classes) == sorted(["'" + c if c != "-1" else c for c in FORMULA_CLASSES])
        assert all(0 <= float(p) <= 1 for p in probabilities)
        assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) for cell in row)


def test_predict_prints_names_escaped(tmp_path, monkeypatch, capsys):
    model = weights(tmp_path, ESCAPE_CLASSES)
    name = f"{ESC}[2Jcleared.png"
    image(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    code = main(["predict", str(model), name, "--top-k", "4"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert ESC not in out and "\x07" not in out and "\t" not in out and "\u202e" not in out
    assert out.startswith("\\x1b[2Jcleared.png: ") and out.count("\n") == 1
    for shown in ("\\x1b[31mred\\x1b[0m", "\\x1b]0;owned\\x07title", "tab\\x09here", "right\\u202eleft"):
        assert shown in out


def test_skipped_and_refused_files_are_named_escaped(tmp_path, monkeypatch, capsys):
    model = weights(tmp_path, ["a", "b"])
    bad = f"{ESC}]0;owned\x07.png"
    (tmp_path / bad).write_bytes(b"not an image")
    image(tmp_path / "ok.png")
    monkeypatch.chdir(tmp_path)
    code = main(["predict", str(model), bad, "ok.png", "--skip-bad"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "skipped 1 unreadable image(s): \\x1b]0;owned\\x07.png\n")
    code = main(["predict", str(model), bad, "ok.png"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and ESC not in err and "\x07" not in err
    assert err.startswith("vggkit: error: \\x1b]0;owned\\x07.png is not a readable image")


def test_evaluate_report_prints_class_names_escaped():
    result = {"classes": ESCAPE_CLASSES, "confusion": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
              "split": "test", "acc": 1.0, "count": 4, "loss": 0.1, "top5_acc": 1.0,
              "per_class": {c: 1.0 for c in ESCAPE_CLASSES}, "weights": "raw", "out_dir": "out"}
    report = format_report(result)
    assert ESC not in report and "\x07" not in report and "\t" not in report and "\u202e" not in report
    assert ["\\x1b[31mred\\x1b[0m", "1.0000"] in [line.split() for line in report.splitlines()]
