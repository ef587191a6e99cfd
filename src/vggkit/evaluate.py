"""`vggkit evaluate`: test accuracy, per-class accuracy, confusion matrix and misclassified examples."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .checkpoint import load_model
from .config import TrainConfig, load_config
from .data import load_data
from .pipeline import BatchLoader
from .preprocess import settings_from_meta
from .rundir import evaluation_dir, find_config
from .runtime import pick_device, speed_settings
from .steps import evaluate_loader


def run_config_for(path: Path) -> TrainConfig:
    """The config of the run a checkpoint belongs to (defaults when the weights stand alone)."""
    found = find_config(path)
    return load_config(found) if found else TrainConfig(precision="fp32")


def evaluate(path: str | Path, *, data: str | None = None, data_dir: str | None = None, device: str = "auto",
             batch_size: int = 512, out_dir: str | Path | None = None, test_limit: int | None = None,
             log=print) -> dict:
    """Evaluate a run (its best checkpoint), a checkpoint directory or a weights file on the test set."""
    path = Path(path)
    config = run_config_for(path)
    torch_device = pick_device(device)
    model, meta = load_model(path, torch_device)
    speed = speed_settings(config, torch_device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    splits = load_data(data or meta.get("dataset", config.data), data_dir=data_dir or config.data_dir, val_size=0,
                       seed=config.seed, allow_sample=bool(meta.get("is_sample")), test_limit=test_limit, log=log)
    if splits.test is None or not len(splits.test):
        from .errors import VggkitError
        raise VggkitError(f"{splits.name} has no test split to evaluate on; give a dataset with test images")
    loader = BatchLoader(splits.test, batch_size, device=torch_device, channels_last=speed.channels_last,
                         **settings_from_meta(meta))
    loss, acc, predicted = evaluate_loader(model, loader, speed, torch_device, want_predictions=True)
    labels = torch.as_tensor(splits.test.labels)
    classes = meta["classes"]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    per_class = {c: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, c in enumerate(classes)}

    out_dir = Path(out_dir) if out_dir else evaluation_dir(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_confusion(confusion, classes, out_dir / "confusion.png")
    wrong = torch.nonzero(predicted != labels).flatten()[:36].tolist()
    _plot_misclassified(splits.test.images[wrong], labels[wrong].tolist(), predicted[wrong].tolist(), classes,
                        out_dir / "misclassified.png")
    return {"test_acc": acc, "test_loss": loss, "count": len(labels), "per_class": per_class,
            "confusion": confusion.tolist(), "classes": classes, "predictions": predicted.tolist(),
            "out_dir": str(out_dir)}


def format_report(result: dict) -> str:
    classes, confusion = result["classes"], result["confusion"]
    width = max(len(c) for c in classes)
    lines = [f"test accuracy {result['test_acc']:.4f} ({result['count']} images), loss {result['test_loss']:.4f}",
             "", "per-class accuracy:"]
    lines += [f"  {c:<{width}}  {a:.4f}" for c, a in result["per_class"].items()]
    lines += ["", "confusion matrix (rows: true, columns: predicted):",
              " " * (width + 2) + "".join(f"{i:>6}" for i in range(len(classes)))]
    lines += [f"  {c:<{width}}" + "".join(f"{n:>6}" for n in row) for c, row in zip(classes, confusion)]
    lines += ["", f"wrote {result['out_dir']}/confusion.png and misclassified.png"]
    return "\n".join(lines)


def _plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max() / 2
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > threshold else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _plot_misclassified(images: np.ndarray, true: list[int], predicted: list[int], classes: list[str], path: Path):
    plt = _pyplot()
    cols = 6
    rows = max(1, -(-len(true) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p in zip(axes.flat, images, true, predicted):
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(f"{classes[t]}\n→ {classes[p]}", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
