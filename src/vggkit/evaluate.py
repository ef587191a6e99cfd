"""`vggkit evaluate`: accuracy (top-1, and top-5 with more than 5 classes), per-class accuracy, precision,
recall and F1, macro and weighted F1, balanced accuracy, calibration (ECE, a reliability diagram; metrics.py),
confusion matrix and the misclassified images (true class, predicted class, confidence) of a run's test or
validation split, or of every image in a folder of class sub-folders.

The run's splits are made again from its config (data, seed, val_size, skip_bad), so they are the
images the run held out: for an image folder too, as long as the folder is unchanged (load.py).

The plots go into the checkpoint folder they describe, unless --out says elsewhere. A training
replaces that folder at each save: when it did so during the evaluation, the figures (of the
checkpoint that was read) are still reported, but the plots have no folder left to go to and are
not written (the report says so; --out keeps them).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import make_folder
from .checkpoint import folder_identity, load_model
from .config import TrainConfig, load_config
from .data import Dataset, load_data, stratified_indices
from .data.dataset import FileDataset
from .data.prepared import prepare_datasets
from .data.folder import load_labelled_folder
from .data.load import TEST_LIMIT_SALT, is_folder
from .errors import VggkitError
from .inference import InferenceRunner, check_policy
from .metrics import (EVALUATION_FILES, calibration, class_metrics, format_class_rows, format_summary,
                      write_evaluation_files)
from .plots import pyplot, write_png
from .preprocess import CENTER, fit_size, settings_from_meta
from .rundir import evaluation_folder, find_checkpoint, find_config
from .runtime import pick_device, speed_settings
from .stream import loader_for, stream_workers
from .tta import TtaPlan, check_level, loader_forward, run_plan
from .untrusted import printable

SPLITS = ("test", "val")
TOP_K = 5  # reported where there are more classes than this
GRID = 36  # misclassified images shown, most confident first
WEIGHTS_USED = {"ema": "weights: averaged (EMA; --raw-weights for the raw ones)", "raw": "weights: raw"}


def run_config_for(path: Path) -> TrainConfig:
    """The config of the run a checkpoint belongs to (defaults when the weights stand alone)."""
    found = find_config(path)
    return load_config(found) if found else TrainConfig(precision="fp32")


def evaluate(path: str | Path, *, data: str | None = None, data_dir: str | None = None, split: str | None = None,
             device: str = "auto", batch_size: int = 512, out_dir: str | Path | None = None,
             test_limit: int | None = None, skip_bad: bool | None = None, averaged: bool = True, compile: str = "auto",
             tta: str = "off", log=print) -> dict:
    """Evaluate a run (its best checkpoint), a checkpoint directory or a weights file.

    split: "test" (default) or "val" of the run's data (or of the named dataset `data`);
    data = a folder: every image of its class sub-folders (the model's classes), no split.
    test_limit: at most that many images (class-balanced, seeded).
    averaged: the averaged weights of a run with --ema (the default), else the raw ones; result["weights"] says which.
    compile: torch.compile the model for inference: "auto" (where measured faster here), "on" or "off"
    (inference.InferenceRunner).
    tta: a tta.TTA_LEVELS name; every figure then comes from the logits averaged over its views.
    out_dir: the folder for the plots (default: the checkpoint's; result["out_dir"] is None where a
    training replaced that folder meanwhile, see the module's docstring).
    """
    check_policy(compile)
    path = Path(path)
    check_level(tta)
    config = run_config_for(path)
    torch_device = pick_device(device)
    checkpoint = find_checkpoint(path)
    read = folder_identity(checkpoint)  # the checkpoint folder whose weights are evaluated
    model, meta = load_model(path, torch_device, averaged=averaged)
    speed = speed_settings(config, torch_device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    skip_bad = config.skip_bad if skip_bad is None else skip_bad
    dataset, name = evaluation_set(config, meta, data=data, data_dir=data_dir, split=split, limit=test_limit,
                                   skip_bad=skip_bad, log=log)
    if isinstance(dataset, FileDataset):  # photos: from the prepared cache at the model's stored size
        dataset = prepare_datasets({"eval": dataset}, fit_size(meta), skip_bad=skip_bad,
                                   workers=stream_workers(config.workers), progress=sys.stderr.isatty(), log=log)["eval"]
    loader = loader_for(dataset, batch_size, device=torch_device, channels_last=speed.channels_last,
                        out_channels=meta["model"]["in_channels"], workers=stream_workers(config.workers, torch_device),
                        **settings_from_meta(meta))
    plan = run_plan(tta, config.flip, meta.get("dataset"), log)
    runner = InferenceRunner(model, speed, torch_device, images=len(dataset) * len(plan.views), batch_size=batch_size,
                             compile=compile, log=log)
    forward = loader_forward(runner, plan, loader) if plan.active else runner
    loss, predicted, in_top_k, confidence = _score(forward, loader, TOP_K)
    result = _summary(dataset, meta["classes"], name, loss, predicted, in_top_k, confidence)
    if tta != "off":  # asked for: the report says which views were used, even none
        result["tta"] = {"level": plan.level, "views": list(plan.views), "description": plan.describe()}
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _plot(result, dataset, meta["classes"], out_dir, model, meta)
    else:
        out_dir = _default_out_dir(checkpoint, name, plan)
        if not _plotted_into_checkpoint(checkpoint, read, lambda: _plot(result, dataset, meta["classes"],
                                                                         make_folder(out_dir), model, meta)):
            out_dir = None
    return result | {"out_dir": out_dir and str(out_dir), "checkpoint": str(checkpoint), "weights": meta["weights"]}


def _plot(result: dict, dataset: Dataset, classes: list[str], out_dir: Path, model=None, meta=None) -> None:
    from .explain import Explainer, overlay

    wrong = result["misclassified"][:GRID]
    _plot_confusion(np.array(result["confusion"]), classes, out_dir / "confusion.png")
    _plot_misclassified(wrong, lambda item: dataset.pixels(item["index"]), out_dir / "misclassified.png")
    if model is not None:  # the same grid under the Grad-CAM of the class each image was taken for
        explainer = Explainer(model, meta)
        _plot_misclassified(wrong, lambda item: np.asarray(overlay(explainer.explain(
            [dataset.pixels(item["index"])], target=item["predicted"])[0])), out_dir / "misclassified_gradcam.png")
    write_evaluation_files(result, out_dir)


def _plotted_into_checkpoint(checkpoint: Path, read: tuple[int, int] | None, plot) -> bool:
    """plot() into a folder of `checkpoint` if it is still the folder that was `read` (folder_identity);
    False where a save swapped it before or while plotting (the plots then went with the old folder)."""
    try:
        if folder_identity(checkpoint) == read:
            plot()
            return folder_identity(checkpoint) == read
    except FileNotFoundError:  # the folder went while plotting
        if folder_identity(checkpoint) == read:
            raise
    return False


def evaluation_set(config: TrainConfig, meta: dict, *, data: str | None, data_dir: str | None, split: str | None,
                   limit: int | None, skip_bad: bool, log) -> tuple[Dataset, str]:
    """(the images to evaluate on, named "test", "val" or by the folder), at the model's image size and channels."""
    if split not in (None, *SPLITS):
        raise VggkitError(f"unknown split {split!r}; choose {' or '.join(SPLITS)}")
    # as the model was trained: photos (a centre crop of the stored image) streamed, other images in memory
    photos = settings_from_meta(meta)["crop"] == CENTER
    shape = dict(image_size=fit_size(meta), channels=meta["model"]["in_channels"],
                 streaming="on" if photos else "off")
    if data is not None and is_folder(data):
        if split is not None:
            raise VggkitError(f"--split picks a split of the run's data, while --data {data} evaluates every image "
                              "in that folder; drop one of them")
        dataset = load_labelled_folder(Path(data).expanduser(), meta["classes"], skip_bad, log, **shape)
        if limit is not None and limit < len(dataset):
            dataset = dataset.subset(stratified_indices(dataset.labels, limit, config.seed, TEST_LIMIT_SALT))
        return dataset, str(data)
    split = split or "test"
    splits = load_data(data or meta.get("dataset", config.data), data_dir=data_dir or config.data_dir,
                       val_size=0 if split == "test" else config.val_size, seed=config.seed,
                       allow_sample=bool(meta.get("is_sample")), skip_bad=skip_bad,
                       test_limit=limit if split == "test" else None, log=log, **shape)
    dataset = splits.test if split == "test" else splits.val
    if dataset is None or not len(dataset):
        other = "--split val" if split == "test" else "--split test"
        raise VggkitError(f"{splits.name} has no {split} split to evaluate on; use {other}, or --data FOLDER")
    if split == "val" and limit is not None and limit < len(dataset):
        dataset = dataset.subset(stratified_indices(dataset.labels, limit, config.seed, TEST_LIMIT_SALT))
    return dataset, split


@torch.no_grad()
def _score(forward, loader, k: int):
    """(mean loss, predicted labels, whether the label is in the top k, confidence of the prediction), on the CPU.
    forward(x): the logits (an InferenceRunner)."""
    loss_sum, predicted, in_top_k, confidence = 0.0, [], [], []
    for x, y in loader:
        logits = forward(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        probabilities = logits.softmax(1)
        top = logits.argmax(1)  # as training's evaluation counts (a tie goes to the first class)
        predicted.append(top.cpu())
        confidence.append(probabilities.gather(1, top[:, None])[:, 0].cpu())
        in_top_k.append((logits.topk(min(k, logits.shape[1]), 1).indices == y[:, None]).any(1).cpu())
    count = sum(len(p) for p in predicted)
    return loss_sum / max(count, 1), torch.cat(predicted), torch.cat(in_top_k), torch.cat(confidence)


def _summary(dataset: Dataset, classes: list[str], name: str, loss: float, predicted: torch.Tensor,
             in_top_k: torch.Tensor, confidence: torch.Tensor) -> dict:
    """The result dict: accuracy, top-k, per class, confusion, the misclassified images (most confident first)."""
    labels = torch.as_tensor(dataset.labels)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    counts = confusion.sum(1)
    per_class = {c: float(confusion[i, i] / counts[i]) if counts[i] else None for i, c in enumerate(classes)}
    wrong = torch.nonzero(predicted != labels).flatten()
    wrong = wrong[torch.argsort(confidence[wrong], descending=True, stable=True)].tolist()
    misclassified = [{"index": i, "path": dataset.paths[i] if dataset.paths else None,
                      "true": classes[int(labels[i])], "predicted": classes[int(predicted[i])],
                      "confidence": round(float(confidence[i]), 4)} for i in wrong]
    acc = int((predicted == labels).sum()) / max(len(labels), 1)
    result = {"split": name, "acc": acc, "loss": loss, "count": len(labels),
              f"top{TOP_K}_acc": int(in_top_k.sum()) / max(len(labels), 1) if len(classes) > TOP_K else None,
              "per_class": per_class, "confusion": confusion.tolist(), "classes": classes,
              "predictions": predicted.tolist(), "misclassified": misclassified}
    result |= class_metrics(confusion, classes)  # precision, recall, F1, macro and balanced figures (metrics.py)
    result["calibration"] = calibration(confidence.numpy(), (predicted == labels).numpy())
    result["ece"] = result["calibration"]["ece"]
    if name == "test":  # the names of the keys before --split and --data FOLDER
        result |= {"test_acc": acc, "test_loss": loss}
    return result


def _default_out_dir(checkpoint: Path, name: str, tta: TtaPlan) -> Path:
    """<checkpoint>/evaluation for the test split, evaluation-val, evaluation-<folder name> otherwise;
    with TTA, "-tta-<level>" added (evaluation-tta-flip), so the plain plots stay."""
    label = None if name == "test" else name if name in SPLITS else Path(name).expanduser().resolve().name
    if tta.active:
        label = f"{label}-tta-{tta.level}" if label else f"tta-{tta.level}"
    return checkpoint / evaluation_folder(label)


def format_report(result: dict) -> str:
    classes, confusion = [printable(c) for c in result["classes"]], result["confusion"]
    width = max(len(c) for c in classes)
    what = {"test": "test", "val": "validation"}.get(result["split"], f"{result['split']}:")
    top_k = result.get(f"top{TOP_K}_acc")
    lines = [tta_line(result["tta"])] if "tta" in result else []
    lines += [f"{what} accuracy {result['acc']:.4f} ({result['count']} images), loss {result['loss']:.4f}"
             + (f", top-{TOP_K} accuracy {top_k:.4f}" if top_k is not None else ""),
             "", "per-class accuracy (recall), precision and F1:"]
    lines += format_class_rows(result, width) + format_summary(result)
    lines += ["", "confusion matrix (rows: true, columns: predicted):",
              " " * (width + 2) + "".join(f"{i:>6}" for i in range(len(classes)))]
    lines += [f"  {c:<{width}}" + "".join(f"{n:>6}" for n in row) for c, row in zip(classes, confusion)]
    lines += ["", WEIGHTS_USED[result.get("weights", "raw")],
              f"wrote {result['out_dir']}/confusion.png, misclassified.png, misclassified_gradcam.png, "
              f"{', '.join(EVALUATION_FILES)}"
              if result["out_dir"] is not None
              else f"plots not written: a training replaced {result['checkpoint']} while it was evaluated (the "
                   "figures above are of the checkpoint read before); --out FOLDER keeps them"]
    return "\n".join(lines)


def tta_line(tta: dict) -> str:
    if tta["views"] == ["identity"]:
        return "TTA: none (1 view: identity); the figures below are plain"
    return (f"TTA: {tta['description']} ({', '.join(tta['views'])}); every figure below is from their mean logits")


def _plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    plt = pyplot()
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
    write_png(fig, path)


def _plot_misclassified(wrong: list[dict], image_of, path: Path) -> None:
    """A grid of misclassified images (image_of(item): H x W x C uint8), titled true class, predicted class
    and confidence."""
    plt = pyplot()
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.0), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, wrong):
        image = image_of(item)
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {item['true']}\n→ {item['predicted']} {item['confidence']:.0%}", fontsize=7)
    fig.tight_layout()
    write_png(fig, path)
