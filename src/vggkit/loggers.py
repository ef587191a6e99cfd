"""What a training run tells the world, through one small interface: a new output is one Logger class.

The loop calls every logger, on rank 0 only, at these points:

    start(info)              the run is set up (RunStart: data, device, sizes, run directory)
    epoch_start(epoch, first_batch)
    step(step, metrics)      after every step; metrics is {} except every 20 steps and at the end
                             of an epoch: {"loss", "acc", "images_per_s", "lr"} of the epoch so far
    epoch(row)               an epoch ended; its checkpoint is saved (the row: train/val/test
                             loss and accuracy, lr, seconds, images_per_s, elapsed)
    interrupted(stop)        SIGINT/SIGTERM: the checkpoint to resume from is saved
    diverged(epoch, step)    the loss or the weights became NaN or infinite (TrainingDiverged follows)
    end(summary)             training finished (RunEnd)

`default_loggers` lists the standard ones (TensorBoardLogger with --tensorboard);
`train(..., loggers=[...])` adds more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import torch

from .atomic import atomic_write_text, make_folder
from .config import load_config, require_tensorboard
from .plots import pyplot, write_png
from .rundir import RunDir


@dataclass
class RunStart:
    run: RunDir
    resumed: bool
    epochs: int  # the number of the last epoch
    batches: int  # per epoch
    history: list[dict]  # the rows of the epochs done before a resume
    dataset: str
    source: str
    is_sample: bool
    device: torch.device
    speed: str  # Speed.describe()
    threads: int
    allocator: str
    world_size: int
    images: tuple[int, int, int]  # train, val, test
    parameters: int
    input_size: int = 0  # the side the network sees
    batch_size: int = 0
    lr: float = 0.0  # the peak learning rate
    augment: tuple[str, ...] = ()  # the training augmentations, e.g. ("crop 2", "flip")
    decisions: dict = field(default_factory=dict)  # decide.py's notes, field -> why (val_size, input_size, ...)
    averaging: str = ""  # weight averaging, as EMA.describe() says it; "" when off
    tta: str = "off"  # the closing report's test-time augmentation (tta.TTA_LEVELS)


@dataclass
class Interruption:
    signal: str  # its name, e.g. SIGINT
    epoch: int
    step: int
    mid_epoch: bool  # False: the stop came at the end of an epoch, after its checkpoint
    after_last_epoch: bool = False  # during the closing figures: the run is complete, some figures were skipped


@dataclass
class RunEnd:
    rows: list[dict] = field(default_factory=list)
    test_acc: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0
    device: torch.device | None = None
    best: dict | None = None  # the row of the epoch saved as checkpoints/best, with its test_acc (if a test split)


class Logger:
    """Override the calls you need; the others do nothing."""

    def start(self, info: RunStart) -> None: ...

    def epoch_start(self, epoch: int, first_batch: int) -> None: ...

    def step(self, step: int, metrics: dict) -> None: ...

    def epoch(self, row: dict) -> None: ...

    def interrupted(self, stop: Interruption) -> None: ...

    def diverged(self, epoch: int, step: int) -> None: ...

    def end(self, summary: RunEnd) -> None: ...


class Loggers(Logger):
    """Several loggers as one, called in order."""

    def __init__(self, loggers=()):
        self.loggers = list(loggers)

    def start(self, info):
        for logger in self.loggers:
            logger.start(info)

    def epoch_start(self, epoch, first_batch):
        for logger in self.loggers:
            logger.epoch_start(epoch, first_batch)

    def step(self, step, metrics):
        for logger in self.loggers:
            logger.step(step, metrics)

    def epoch(self, row):
        for logger in self.loggers:
            logger.epoch(row)

    def interrupted(self, stop):
        for logger in self.loggers:
            logger.interrupted(stop)

    def diverged(self, epoch, step):
        for logger in self.loggers:
            logger.diverged(epoch, step)

    def end(self, summary):
        for logger in self.loggers:
            logger.end(summary)


def default_loggers(run: RunDir, log, progress_bar: bool, tensorboard: bool = False) -> list[Logger]:
    """The standard outputs, in the order they are told (files before the console line about them)."""
    return [
        *([ProgressBar()] if progress_bar else []),
        CsvLogger(run),
        EventLog(run),
        CurvesPlot(run),
        *([TensorBoardLogger(run)] if tensorboard else []),
        ConsoleLogger(log),
    ]


class ConsoleLogger(Logger):
    """The lines `vggkit train` prints, through `log` (print by default)."""

    def __init__(self, log=print):
        self.log = log

    def start(self, info):
        self.run_dir, self.epochs = info.run.path, info.epochs
        sample = " [bundled sample: accuracy not comparable to published figures]" if info.is_sample else ""
        self.log(f"vggkit: {info.dataset} ({info.source}){sample}")
        self.log(data_line(info))
        cpu = f", {info.threads} threads, {info.allocator} allocator" if info.device.type == "cpu" else ""
        processes = f", {info.world_size} processes" if info.world_size > 1 else ""
        self.log(f"device: {info.device} ({info.speed}{cpu}){processes}; {info.parameters:,} parameters; "
                 f"run dir {self.run_dir}")

    def epoch(self, row):
        parts = [f"epoch {row['epoch']}/{self.epochs}", f"train loss {row['train_loss']:.4f}",
                 f"train acc {row['train_acc']:.4f}"]
        if "val_acc" in row:
            parts.append(f"val acc {row['val_acc']:.4f}")
        if "test_acc" in row:
            parts.append(f"test acc {row['test_acc']:.4f}")
        parts.append(f"{row['seconds']:.1f} s ({row['images_per_s']:.0f} img/s)")
        self.log(", ".join(parts))

    def interrupted(self, stop):
        if stop.after_last_epoch:
            self.log(f"{stop.signal} after the last epoch: every checkpoint is saved and the curves are drawn; "
                     f"closing test figures not yet begun were skipped (vggkit evaluate {self.run_dir} gives them)")
            return
        where = f"at epoch {stop.epoch}, step {stop.step}" if stop.mid_epoch else f"after epoch {stop.epoch}"
        self.log(f"{stop.signal}: saved a checkpoint {where}; resume with: vggkit train --resume {self.run_dir}")

    def end(self, summary):
        if summary.best is not None:
            self.log(best_line(summary.best, summary.rows[-1]["epoch"]))
        if summary.rows:
            last = summary.rows[-1]  # the textbook's closing line, of the last epoch
            self.log(f"last epoch: loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}"
                     + (f", test acc {summary.test_acc:.3f}" if summary.test_acc is not None else ""))
        self.log(f"{summary.images_per_s:.1f} examples/sec on {summary.device}; total {summary.seconds:.1f} s; "
                 f"run dir {self.run_dir}")


def data_line(info: RunStart) -> str:
    """The header line of what the run trains on and how; (why) after each value decided from the data."""
    def why(key: str) -> str:
        return f" ({info.decisions[key]})" if info.decisions.get(key) else ""

    train, val, test = info.images
    streamed = f"streamed from a prepared cache{why('streaming')}; " if "streaming" in info.decisions else ""
    return (f"data: train {train:,}, val {val:,}{why('val_size')}, test {test:,} images; {streamed}"
            f"input {info.input_size}x{info.input_size}{why('input_size')}; "
            f"batch {info.batch_size}{why('batch_size')}, lr {info.lr:g}{why('lr')}, {info.batches} step{'s' if info.batches != 1 else ''} per epoch, "
            f"{info.epochs} epochs{why('epochs')}; augment: {', '.join(info.augment) or 'none'}{why('flip')}"
            + (f"; head pool {why('head_pool').strip(' ()')}" if info.decisions.get("head_pool") else "")
            + (f"; {info.decisions['backbone_lr']}" if info.decisions.get("backbone_lr") else "")
            + (f"; {info.decisions['balance']}" if info.decisions.get("balance") else "")
            + (f"; {info.averaging}" if info.averaging else "")
            + (f"; closing test figure also with {info.tta} TTA" if info.tta != "off" else ""))


def best_line(best: dict, last_epoch: int) -> str:
    """The closing line about checkpoints/best: its epoch, what chose it, its test accuracy."""
    chosen_by = f"val acc {best['val_acc']:.4f}" if "val_acc" in best else \
        f"train acc {best['train_acc']:.4f} (no validation split)"
    test = f"test acc {best['test_acc']:.4f}" if "test_acc" in best else "no test split"
    if "tta_test_acc" in best:  # train --tta: reported beside the plain figure, chose nothing
        test += f", with TTA ({best['tta']}) {best['tta_test_acc']:.4f}"
    return (f"best checkpoint (what evaluate, predict and export use): epoch {best['epoch']} of {last_epoch} "
            f"by {chosen_by}; {test}")


class ProgressBar(Logger):
    """A tqdm bar per epoch on stderr: loss, accuracy and images/s of the epoch so far."""

    def start(self, info):
        self.epochs, self.batches = info.epochs, info.batches
        self.bar = None

    def epoch_start(self, epoch, first_batch):
        from tqdm import tqdm

        self.bar = tqdm(total=self.batches, initial=first_batch, desc=f"epoch {epoch}/{self.epochs}", unit="batch",
                        leave=False, dynamic_ncols=True)

    def step(self, step, metrics):
        if metrics:
            self.bar.set_postfix_str(f"loss {metrics['loss']:.3f} acc {metrics['acc']:.3f} "
                                     f"{metrics['images_per_s']:.0f} img/s")
        self.bar.update(1)
        if self.bar.n >= self.batches:  # gone before the epoch's evaluation, as its last batch is done
            self._close()

    def epoch(self, row):
        self._close()

    def interrupted(self, stop):
        self._close()

    def diverged(self, epoch, step):
        self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CsvLogger(Logger):
    """The run's metrics CSV: one row per epoch, rewritten whole (atomically) after each."""

    KEYS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds",
            "images_per_s", "elapsed"]

    def __init__(self, run: RunDir):
        self.run = run
        self.rows: list[dict] = []

    def start(self, info):
        self.rows = list(info.history)

    def epoch(self, row):
        self.rows.append(row)
        lines = [",".join(self.KEYS)] + [",".join(_csv_value(r.get(k)) for k in self.KEYS) for r in self.rows]
        atomic_write_text(self.run.metrics_csv, "\n".join(lines) + "\n")


def _csv_value(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class EventLog(Logger):
    """The run's event log: one JSON object a line (start or resume, epoch, interrupted, diverged, end)."""

    def __init__(self, run: RunDir):
        self.run = run

    def start(self, info):
        self.run.log_event({"event": "resume" if info.resumed else "start",
                            "time": datetime.now().isoformat(timespec="seconds")})

    def epoch(self, row):
        self.run.log_event({"event": "epoch", **row})

    def interrupted(self, stop):
        if stop.mid_epoch:  # a stop at an epoch's end is not logged: its "epoch" event is the last (as before)
            self.run.log_event({"event": "interrupted", "signal": stop.signal, "epoch": stop.epoch, "step": stop.step})

    def diverged(self, epoch, step):
        self.run.log_event({"event": "diverged", "epoch": epoch, "step": step})

    def end(self, summary):
        best = summary.best or {}
        # train --tta: the best checkpoint's test figures, plain and with TTA (test_acc above is the last epoch's)
        tta = {"best_checkpoint": {k: best.get(k) for k in ("epoch", "test_acc", "tta", "tta_test_acc", "tta_test_loss")}
               } if "tta_test_acc" in best else {}
        self.run.log_event({"event": "end", "test_acc": summary.test_acc, "seconds": round(summary.seconds, 2),
                            "images_per_s": round(summary.images_per_s, 1), **tta})


class CurvesPlot(Logger):
    """The run's curves at the end: loss (left) and accuracy (right) against epoch, the best checkpoint's
    epoch marked on both."""

    CURVES = {"loss": ("train_loss", "val_loss", "test_loss"), "accuracy": ("train_acc", "val_acc", "test_acc")}
    STYLES = {"train": "-", "val": "-.", "test": ":"}

    def __init__(self, run: RunDir):
        self.run = run

    def end(self, summary):
        if not summary.rows:
            return
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=120)
        for ax, (quantity, keys) in zip(axes, self.CURVES.items()):
            self._panel(ax, summary, quantity, keys)
        fig.tight_layout()
        write_png(fig, self.run.curves_path)

    def _panel(self, ax, summary, quantity: str, keys: tuple[str, ...]) -> None:
        from matplotlib.ticker import MaxNLocator

        rows = summary.rows
        epochs = [r["epoch"] for r in rows]
        for key in keys:
            if all(key in r for r in rows):
                split = key.split("_")[0]
                ax.plot(epochs, [r[key] for r in rows], self.STYLES[split], marker="o", markersize=3, label=split)
        if summary.best is not None:
            ax.axvline(summary.best["epoch"], color="gray", linewidth=1, alpha=0.6,
                       label=f"best checkpoint (epoch {summary.best['epoch']})")
        ax.set_title(quantity)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(epochs) + 0.5)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

class TensorBoardLogger(Logger):
    """Event files under RUN/tensorboard/: `step/...` scalars at the console's pace (every PROGRESS_EVERY
    steps: running train loss and accuracy, lr, images/s), `epoch/...` scalars from each epoch's row
    (the metrics.csv columns, x = epoch), the config as text and, at the end, as hyperparameters
    with the final figures. A resumed run appends to the same directory."""

    def __init__(self, run: RunDir):
        require_tensorboard()  # here, not at start(): the loggers are made before the run writes anything
        self.run = run
        self.writer = None

    def start(self, info):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(make_folder(self.run.tensorboard_dir)))
        if not info.resumed:
            config = self.run.config_path.read_text(encoding="utf-8") if self.run.config_path.is_file() else ""
            self.writer.add_text("config", "".join(f"    {line}\n" for line in config.splitlines()))  # as code

    def step(self, step, metrics):
        for key, tag in (("loss", "train_loss"), ("acc", "train_acc"), ("lr", "lr"), ("images_per_s", "images_per_s")):
            if key in metrics:
                self.writer.add_scalar(f"step/{tag}", metrics[key], step)

    def epoch(self, row):
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        self.writer.flush()  # TensorBoard shows each epoch as it ends

    def interrupted(self, stop):
        self.writer.close()

    def diverged(self, epoch, step):
        self.writer.close()

    def end(self, summary):
        final = {f"hparam/{key}": value for key, value in (summary.rows[-1] if summary.rows else {}).items()
                 if key in ("train_loss", "train_acc", "val_loss", "val_acc")}
        if summary.test_acc is not None:
            final["hparam/test_acc"] = summary.test_acc
        hparams = load_config(self.run.config_path).to_dict() if self.run.config_path.is_file() else {}
        self.writer.add_hparams(hparams, final, run_name=".")  # ".": beside the scalars, not in a sub-run
        self.writer.close()
