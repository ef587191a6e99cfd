"""metrics.py: per-class precision, recall, F1, macro and weighted F1 and balanced accuracy against
scikit-learn on random labels; a class never predicted; calibration's bins and ECE; the files evaluate
writes beside the confusion matrix."""
import csv
import json
import warnings

import numpy as np
import pytest

from vggkit.metrics import calibration, class_metrics, format_class_rows, format_summary, write_evaluation_files

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def confusion_of(y_true, y_pred, classes):
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    return confusion


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(2, 9))
    n = int(rng.integers(5, 300))
    # skewed draws: some classes rare or absent, some never predicted
    y_true = rng.choice(classes, n, p=rng.dirichlet(np.full(classes, 0.5)))
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(classes, n, p=rng.dirichlet(np.full(classes, 0.5))))
    names = [f"c{i}" for i in range(classes)]
    got = class_metrics(confusion_of(y_true, y_pred, classes), names)
    present = sorted(set(y_true.tolist()))  # the macro figures average the classes with images
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=range(classes), zero_division=0)
    for i, name in enumerate(names):
        m = got["per_class_metrics"][name]
        assert (m["precision"], m["recall"], m["f1"], m["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0), abs=1e-12)
    assert got["weighted_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y_true, y_pred, labels=range(classes), average="weighted", zero_division=0), abs=1e-12)
    with warnings.catch_warnings():  # sklearn warns where a predicted class has no true images
        warnings.simplefilter("ignore")
        expected = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
    assert got["balanced_acc"] == pytest.approx(expected, abs=1e-12)


def test_majority_answer_looks_good_in_accuracy_only():
    """95 of one class, 5 of the other, always the majority: accuracy 0.95, balanced accuracy 0.5, and
    the minority class's precision (never predicted) is 0 with a note."""
    got = class_metrics(np.array([[95, 0], [5, 0]]), ["common", "rare"])
    assert got["balanced_acc"] == 0.5 and got["per_class_metrics"]["rare"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 5}
    assert got["macro_f1"] == pytest.approx((2 * 0.95 / 1.95 + 0) / 2)
    assert got["metric_notes"] == ["never predicted (precision taken as 0): rare"]


def test_a_class_without_images_is_listed_not_averaged():
    got = class_metrics(np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]]), ["a", "b", "absent"])
    assert got["balanced_acc"] == pytest.approx((0.75 + 1) / 2)
    assert got["per_class_metrics"]["absent"]["support"] == 0
    assert got["metric_notes"] == ["no images (left out of the macro figures): absent"]
    rows = format_class_rows(got | {"per_class": {}}, 6)
    assert rows[-1] == "  absent  (no images)" and "balanced accuracy 0.8750" in format_summary(got)[0]


def test_calibration_bins_and_ece():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 500)
    correct = rng.random(500) < confidence ** 2
    got = calibration(confidence, correct, bins=15)
    # a direct reading of the definition: bins (b/15, (b+1)/15]
    ece = 0.0
    for b in range(15):
        inside = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
            assert got["count"][b] == inside.sum()
    assert got["ece"] == pytest.approx(ece, abs=1e-12) and sum(got["count"]) == 500
    assert calibration(np.ones(4), np.ones(4, bool))["ece"] == 0  # sure and right: calibrated
    assert calibration(np.ones(4), np.zeros(4, bool))["ece"] == 1  # sure and wrong: as bad as it gets


def test_evaluation_files(tmp_path):
    result = {"acc": 0.5, "predictions": [0, 1], **class_metrics(np.array([[1, 1], [0, 0]]), ["=cmd", "b"]),
              "calibration": calibration(np.array([0.9, 0.6]), np.array([True, False]))}
    write_evaluation_files(result, tmp_path)
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.reader((tmp_path / "per_class.csv").open()))
    assert rows[0] == ["class", "precision", "recall", "f1", "support"] and rows[1][0] == "'=cmd"  # shown as text
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert "predictions" not in saved and saved["balanced_acc"] == 0.5 and saved["calibration"]["bins"] == 15
