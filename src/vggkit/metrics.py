"""Classification figures beyond accuracy, for `vggkit evaluate`: per-class precision, recall, F1 and
support, macro and weighted F1 and balanced accuracy (from the confusion matrix), and calibration
(the reliability diagram and its expected calibration error).

Definitions (C: the confusion matrix, rows true, columns predicted):
    support_i    C[i, :].sum(), the class's images
    precision_i  C[i, i] / C[:, i].sum(); 0 for a class never predicted (noted; sklearn's zero_division=0)
    recall_i     C[i, i] / support_i (the per-class accuracy)
    f1_i         2 precision_i recall_i / (precision_i + recall_i); 0 where both are 0
    macro F1     the mean of f1_i over the classes with images (a class absent from the evaluated
                 images has no recall to speak of: it is listed, not averaged)
    weighted F1  the mean of f1_i weighted by support_i
    balanced accuracy  the mean of recall_i over the classes with images (sklearn's balanced_accuracy_score);
                 a model that always answers the majority class scores 1 / classes
    ECE          expected calibration error over CALIBRATION_BINS equal-width bins of the confidence
                 (the top class's probability): sum over bins of (images in bin / images) x
                 |accuracy in bin - mean confidence in bin| (Guo et al., 2017, 15 bins)
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .atomic import ENCODING, ENCODING_ERRORS, atomic_write
from .plots import pyplot, write_png
from .untrusted import csv_cell

CALIBRATION_BINS = 15


def class_metrics(confusion: np.ndarray, classes: list[str]) -> dict:
    """Per-class precision, recall, F1 and support, macro and weighted F1, balanced accuracy and notes
    (classes never predicted, classes without images) from a confusion matrix (rows true, columns predicted)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    hits = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    present = support > 0
    total = int(support.sum())
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(support[i])} for i, c in enumerate(classes)}
    notes = []
    never = [c for i, c in enumerate(classes) if present[i] and predicted[i] == 0]
    if never:
        notes.append(f"never predicted (precision taken as 0): {', '.join(never)}")
    absent = [c for i, c in enumerate(classes) if not present[i]]
    if absent:
        notes.append(f"no images (left out of the macro figures): {', '.join(absent)}")
    return {"per_class_metrics": per_class,
            "macro_f1": float(f1[present].mean()) if present.any() else None,
            "weighted_f1": float((f1 * support).sum() / total) if total else None,
            "balanced_acc": float(recall[present].mean()) if present.any() else None,
            "metric_notes": notes}


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """The reliability diagram's bins (equal-width over (0, 1]: count, accuracy, mean confidence) and the
    expected calibration error (see the module docstring)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    # bin b holds confidences in (b / bins, (b + 1) / bins]; 0 (never a softmax maximum) goes to the first
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    accuracy = np.divide(np.bincount(which, correct, bins), count, out=np.zeros(bins), where=count > 0)
    mean_confidence = np.divide(np.bincount(which, confidence, bins), count, out=np.zeros(bins), where=count > 0)
    n = max(len(confidence), 1)
    ece = float((count / n * np.abs(accuracy - mean_confidence)).sum())
    return {"ece": ece, "bins": bins, "count": count.tolist(), "accuracy": accuracy.round(6).tolist(),
            "confidence": mean_confidence.round(6).tolist()}


def format_class_rows(result: dict, width: int) -> list[str]:
    """The report's per-class table: accuracy (= recall), precision, F1 and images of each class."""
    from .untrusted import printable

    if "per_class_metrics" not in result:  # a result dict made without them: the accuracy alone
        return [f"  {printable(c):<{width}}  {a:.4f}" if a is not None else f"  {printable(c):<{width}}  (no images)"
                for c, a in result["per_class"].items()]
    lines = [f"  {'':<{width}}  accuracy  precision      F1  images"]
    for name, m in result["per_class_metrics"].items():
        if not m["support"]:
            lines.append(f"  {printable(name):<{width}}  (no images)")
            continue
        lines.append(f"  {printable(name):<{width}}  {m['recall']:>8.4f}  {m['precision']:>9.4f}  {m['f1']:.4f}"
                     f"  {m['support']:>6}")
    return lines


def format_summary(result: dict) -> list[str]:
    """The report's lines after the table: macro and weighted F1, balanced accuracy, ECE and the notes."""
    lines = []
    if result.get("macro_f1") is not None:
        lines.append(f"macro F1 {result['macro_f1']:.4f}, weighted F1 {result['weighted_f1']:.4f}, "
                     f"balanced accuracy {result['balanced_acc']:.4f}")
    if "calibration" in result:
        lines.append(f"expected calibration error (ECE, {result['calibration']['bins']} bins) "
                     f"{result['calibration']['ece']:.4f}")
    return lines + [f"note: {note}" for note in result.get("metric_notes", ())]


def write_class_csv(result: dict, path: Path) -> None:
    """class, precision, recall, f1 and support rows, atomically; class names that a spreadsheet
    would run as formulas are written as text (untrusted.csv_cell)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding=ENCODING, errors=ENCODING_ERRORS) as f:
            writer = csv.writer(f)
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            for name, m in result["per_class_metrics"].items():
                writer.writerow([csv_cell(name), f"{m['precision']:.6f}", f"{m['recall']:.6f}", f"{m['f1']:.6f}",
                                 m["support"]])

    atomic_write(path, write)


def plot_reliability(calibrated: dict, path: Path) -> None:
    """The reliability diagram: accuracy against confidence per bin, the diagonal a calibrated model
    follows, the gap shaded; ECE in the title."""
    plt = pyplot()
    bins = calibrated["bins"]
    edges = np.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    count = np.array(calibrated["count"])
    filled = count > 0
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.bar(centres[filled], np.array(calibrated["accuracy"])[filled], width=width, edgecolor="black",
           color="tab:blue", label="accuracy")
    gap_low = np.minimum(calibrated["accuracy"], calibrated["confidence"])[filled]
    gap = np.abs(np.array(calibrated["accuracy"]) - np.array(calibrated["confidence"]))[filled]
    ax.bar(centres[filled], gap, bottom=gap_low, width=width, color="tab:red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"reliability: ECE {calibrated['ece']:.4f} ({bins} bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    write_png(fig, path)


EVALUATION_FILES = ("reliability.png", "per_class.csv", "metrics.json")


def write_evaluation_files(result: dict, out_dir: Path) -> None:
    """Beside the confusion matrix: the reliability diagram, the per-class CSV and the figures as JSON
    (what `vggkit evaluate --json` prints but the per-image predictions)."""
    import json

    from .atomic import atomic_write_text

    plot_reliability(result["calibration"], out_dir / "reliability.png")
    write_class_csv(result, out_dir / "per_class.csv")
    atomic_write_text(out_dir / "metrics.json",
                      json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2) + "\n")
