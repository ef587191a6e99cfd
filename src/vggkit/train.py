"""The training loop, top to bottom: config -> data -> model -> steps -> run directory.

    history = vggkit.train({"preset": "fast", "epochs": 5})

train() opens the run (new or resumed), sets up a Trainer (what the run works with) and a
LoopState (where it is), then `for epoch: train_one_epoch(); end_epoch()` and finish(). A stop
request (SIGINT/SIGTERM) ends it through interrupt(). Everything the run tells the world goes
through its loggers (loggers.py); its files are named by rundir.py.

The run directory is locked for the whole run; a new one is written only once the data is loaded.
Weights are saved only when they and their loss are finite (check_saveable): a diverged run
never leaves a NaN model behind as its last or best checkpoint. With weight averaging (--ema,
ema.py) the average is updated after every step taken, the epochs are evaluated with it (so it
picks the best checkpoint), and checkpoints hold it beside the raw weights.
"""
from __future__ import annotations

import itertools
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import distributed as dist
from .balance import class_weights, sample_weights
from .bounds import check_training_fits
from .checkpoint import all_finite, check_training_state, check_weights, save_checkpoint, split_averaged
from .config import RECIPES, TrainConfig, resolve_config, save_config, with_absolute_paths
from .data import load_data
from .data.carve import carve
from .decide import REFERENCE_LR, decide
from .ema import EMA
from .errors import VggkitError
from .inference import forward_pass
from .loggers import Interruption, Logger, Loggers, RunEnd, RunStart, default_loggers
from .model import set_kernels
from .optim import lr_at, make_optimizer, set_lr
from .pipeline import Augment, Batches
from .stream import loader_for, stream_workers
from .pretrained import freeze_blocks, init_model
from .rundir import STATE, WEIGHTS, RunDir
from .preprocess import CENTER, preprocess_meta, storage_size
from .runtime import ProcessSettings, Speed, in_main_thread, pick_device, speed_settings
from .steps import evaluate_loader, train_step
from .tta import loader_forward, run_plan

if TYPE_CHECKING:
    from .data import DataSplits

__all__ = ["History", "StopRequest", "TrainingDiverged", "lr_at", "make_optimizer", "train"]

PROGRESS_EVERY = 20  # steps between reads of the running loss (each one waits for the device)


class TrainingDiverged(VggkitError):
    """The loss or the weights became NaN or infinite."""


@dataclass
class History:
    run_dir: Path
    epochs: list[dict] = field(default_factory=list)
    test_acc: float | None = None  # the last epoch's (the textbook's figure)
    test_loss: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0
    interrupted: bool = False
    best: dict | None = None  # the epoch row of checkpoints/best, with its test accuracy (what evaluate reports)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if sys.platform != "win32" and in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Trainer:
    """What a run works with, fixed once it is set up."""
    config: TrainConfig
    run: RunDir
    rank: int
    world_size: int
    device: torch.device
    speed: Speed
    allocator: str
    splits: DataSplits
    train_loader: Batches
    val_loader: Batches | None
    test_loader: Batches | None
    model: torch.nn.Module  # the network whose weights are saved
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    meta: dict  # what a checkpoint's weights carry: classes, preprocessing, dataset
    started: float  # time.perf_counter() when train() was called
    log: Callable = print  # messages before the loggers start (data, resume)
    on_step: Callable[[int], None] | None = None
    loggers: Logger = field(default_factory=Loggers)
    step_model: torch.nn.Module | None = None  # what the steps run: the model, maybe under DDP and compiled
    decisions: dict = field(default_factory=dict)  # what decide.py decided from the data: field -> why
    ema: EMA | None = None  # the averaged weights (config.ema > 0)
    class_weights: torch.Tensor | None = None  # the loss's per-class weights (balance "weights"), on the device

    @property
    def main(self) -> bool:
        return self.rank == 0  # the one rank that writes files and speaks

    @property
    def evaluated(self) -> torch.nn.Module:
        """The network the epochs are evaluated with: the averaged weights when there are some."""
        return self.ema.module if self.ema else self.model

    @property
    def total_steps(self) -> int:
        return self.config.epochs * len(self.train_loader)


@dataclass
class LoopState:
    """Where the run is: what a training checkpoint stores besides the weights and the optimizer."""
    sums: torch.Tensor  # this epoch's (loss sum, correct, count) so far, on the device
    history: History
    epoch: int = 1  # the epoch being trained (after end_epoch: the next one)
    batch: int = 0  # the epoch's next batch (not 0 only when resumed or stopped mid-epoch)
    step: int = 0  # optimisation steps done
    best_val: float = -1.0
    seconds_before: float = 0.0  # the run's time before this resume
    train_seconds: float = 0.0  # this process's time in training steps, and the images they saw
    train_images: int = 0
    best_test_logits: list[torch.Tensor] | None = None  # checkpoints/best's, batch by batch, with TTA (not saved)

    def next_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0
        self.sums.zero_()

    def training_state(self, optimizer, world_size: int, seconds: float) -> dict:
        return {
            "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "sums": self.sums.cpu(),
            "best_val": self.best_val, "history": json.dumps(self.history.epochs), "world_size": world_size,
            "seconds": seconds,
        }


@dataclass
class EpochRun:
    seconds: float  # from the epoch's first step to its last
    images: int  # this process's images


# ---------------------------------------------------------------------------------------------
# The loop

def train(config: TrainConfig | dict | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: str = "auto", log=print, on_step=None, loggers: list[Logger] = ()) -> History:
    """Train a VGG; returns the history. `progress`: auto (bar on a TTY), bar, lines or none.

    `config` is a TrainConfig or a dict of its fields (a "preset" key picks the base preset).
    `resume` is a run directory to continue; `on_step(step)` is called after every step;
    `loggers` are told the run's progress besides the standard outputs (see loggers.py).
    The process-wide settings it changes (threads, denormals, the CPU allocator) are put back on return.
    """
    with ProcessSettings() as settings:
        started = time.perf_counter()
        dist.init_from_env()  # under torchrun: join the process group (a plain process: no-op)
        rank, world_size = dist.world()
        if rank != 0:  # only rank 0 speaks and writes
            log, progress = (lambda *a, **k: None), "none"
        run, config, state = open_run(config, resume, overwrite, world_size)
        try:
            t = set_up(config, run, settings, log, on_step, started, resumed=state is not None)
            if state is None:  # the data is loaded and checked: now the run directory may be written
                dist.from_main(lambda: run.claim(overwrite))
            loop = restore(t, state) if state is not None else LoopState(fresh_sums(t), History(run.path))
            t.step_model = parallel_and_compiled(t, loop.step)
            if t.main:
                show_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
                t.loggers = Loggers([*default_loggers(run, log, show_bar, t.config.tensorboard), *(loggers or ())])
            start(t, loop, resumed=state is not None)
            return run_epochs(t, loop)
        finally:
            run.unlock()


def run_epochs(t: Trainer, loop: LoopState) -> History:
    """The epochs from loop.epoch on, then finish(); or interrupt() on a stop request."""
    with StopRequest() as stop:
        for epoch in range(loop.epoch, t.config.epochs + 1):
            trained = train_one_epoch(t, loop, stop)
            if trained is None:
                return interrupt(t, loop, stop)
            end_epoch(t, loop, trained)
            if dist.agree_stop(stop) is not None and epoch < t.config.epochs:  # all ranks agree
                return interrupt(t, loop, stop)
        return finish(t, loop, stop)  # a stop request during the closing figures cuts them short


def train_one_epoch(t: Trainer, loop: LoopState, stop: StopRequest) -> EpochRun | None:
    """Train loop.epoch from loop.batch on; None when a stop request came before its last batch."""
    t.model.train()
    t.train_loader.set_epoch(loop.epoch)
    batches, batch_size = len(t.train_loader), t.config.batch_size
    t.loggers.epoch_start(loop.epoch, loop.batch)
    epoch_start = time.perf_counter()
    images = 0
    for batch_index, (x, y) in enumerate(t.train_loader.iter_from(loop.batch), start=loop.batch):
        lr = lr_at(t.config, loop.step, t.total_steps)
        set_lr(t.optimizer, lr)
        global_count = min(batch_size, len(t.splits.train) - batch_index * batch_size)
        scale = t.scaler.get_scale() if t.scaler and t.ema else None
        train_step(t.step_model, t.optimizer, t.scaler, t.speed, x, y, loop.sums,
                   lambda logits, y: dist.batch_loss(logits, y, global_count, t.config.label_smoothing,
                                                     t.class_weights))
        loop.step += 1
        if t.ema and (scale is None or t.scaler.get_scale() >= scale):  # fp16: a lowered scale = a skipped step
            t.ema.update(t.model, loop.step)
        loop.batch = batch_index + 1
        images += len(y)
        metrics = {}
        if loop.step % PROGRESS_EVERY == 0 or loop.batch == batches:
            metrics = step_metrics(t, loop, lr, images, epoch_start)
        t.loggers.step(loop.step, metrics)
        if t.on_step:
            t.on_step(loop.step)
        if dist.agree_stop(stop) is not None and loop.batch < batches:  # all ranks agree
            return None
    return EpochRun(time.perf_counter() - epoch_start, images)


def step_metrics(t: Trainer, loop: LoopState, lr: float, images: int, epoch_start: float) -> dict:
    """The epoch's running loss, accuracy and speed (one device sync); TrainingDiverged if the loss is not finite."""
    loss_sum, correct, count = loop.sums.tolist()
    if not math.isfinite(loss_sum):
        raise diverged(t, loop, f"loss became {loss_sum / max(count, 1)}")
    images_per_s = images * t.world_size / max(time.perf_counter() - epoch_start, 1e-9)
    return {"loss": loss_sum / count, "acc": correct / count, "images_per_s": images_per_s, "lr": lr}


def end_epoch(t: Trainer, loop: LoopState, trained: EpochRun) -> None:
    """Evaluate, record the epoch's row, save the last (and maybe best) checkpoint, tell the loggers."""
    loop.train_seconds += trained.seconds
    loop.train_images += trained.images * t.world_size
    dist.all_reduce_sum(loop.sums)
    test_logits = [] if t.config.tta != "off" else None  # the closing TTA's identity view, if this is the best
    row = epoch_row(t, loop, trained, test_logits)
    check_saveable(t, loop, row.get("val_loss", row.get("test_loss")))
    loop.history.epochs.append(row)
    score = selection_score(row)
    is_best = score >= loop.best_val  # of equals the later: trained longer (small val sets tie often)
    loop.best_val = max(loop.best_val, score)
    loop.next_epoch()
    meta = t.meta | {"epoch": row["epoch"], **{k: row[k] for k in ("train_acc", "val_acc", "test_acc") if k in row}}
    save_last(t, loop, meta)
    if is_best:
        loop.best_test_logits = test_logits or None
        if t.main:
            save_checkpoint(t.run.best, t.model, meta, averaged=t.ema)
    t.loggers.epoch(row)


def selection_score(row: dict) -> float:
    """What picks the best checkpoint: validation accuracy, or training accuracy without a validation split."""
    return row.get("val_acc", row["train_acc"])


def epoch_row(t: Trainer, loop: LoopState, trained: EpochRun, test_logits: list | None = None) -> dict:
    """The epoch's figures; the test batches' logits appended to `test_logits` (None: not kept)."""
    loss_sum, correct, count = loop.sums.tolist()
    row = {"epoch": loop.epoch, "train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1)}
    if t.val_loader:
        row["val_loss"], row["val_acc"] = evaluate_loader(t.evaluated, t.val_loader, t.speed, t.device)
    if t.test_loader and t.config.eval_every_epoch_on_test:
        row["test_loss"], row["test_acc"] = evaluate_loader(t.evaluated, t.test_loader, t.speed, t.device,
                                                            forward=kept_forward(t, test_logits))
    row.update(lr=lr_at(t.config, loop.step, t.total_steps), seconds=round(trained.seconds, 3),
               images_per_s=round(trained.images * t.world_size / trained.seconds, 1),
               elapsed=round(time.perf_counter() - t.started + loop.seconds_before, 2))
    return row


def interrupt(t: Trainer, loop: LoopState, stop: StopRequest) -> History:
    """Stop on a signal, leaving a checkpoint to resume from (at an epoch's end, end_epoch wrote it)."""
    mid_epoch = loop.batch > 0
    if mid_epoch:
        dist.all_reduce_sum(loop.sums)  # saved global: the resumed run continues the epoch's sums
        check_saveable(t, loop, None)
        save_last(t, loop, t.meta)
    epoch = loop.epoch if mid_epoch else loop.epoch - 1
    t.loggers.interrupted(Interruption(signal.Signals(stop.signal).name, epoch, loop.step, mid_epoch))
    loop.history.interrupted = True
    return loop.history


def finish(t: Trainer, loop: LoopState, stop: StopRequest) -> History:
    """The closing figures (the test accuracy of the last epoch and of the best checkpoint), then the
    loggers' end (curves, the closing lines). A stop request skips the figures not yet begun: every
    checkpoint is saved already, and the run still ends with its curves and event log."""
    history = loop.history
    history.seconds = time.perf_counter() - t.started + loop.seconds_before
    history.images_per_s = loop.train_images / loop.train_seconds if loop.train_seconds else 0.0
    if t.test_loader and dist.agree_stop(stop) is None:
        last = history.epochs[-1]
        history.test_loss, history.test_acc = (last["test_loss"], last["test_acc"]) if "test_acc" in last \
            else evaluate_loader(t.evaluated, t.test_loader, t.speed, t.device)
    history.best = best_checkpoint(t, history.epochs, tested=dist.agree_stop(stop) is None)
    if history.best is not None and t.test_loader and t.config.tta != "off" and dist.agree_stop(stop) is None:
        history.best |= best_with_tta(t, loop.best_test_logits)
    t.loggers.end(RunEnd(history.epochs, history.test_acc, history.seconds, history.images_per_s, t.device,
                         best=history.best))
    if stop.signal is not None:
        history.interrupted = True
        t.loggers.interrupted(Interruption(signal.Signals(stop.signal).name, history.epochs[-1]["epoch"], loop.step,
                                           mid_epoch=False, after_last_epoch=True))
    return history


def check_saveable(t: Trainer, loop: LoopState, loss: float | None) -> None:
    """Before a checkpoint is written: TrainingDiverged unless the weights, the averaged ones too,
    are finite (one fused reduction) and so is their loss: `loss` (the epoch's validation or test
    loss, measured on t.evaluated), or else that of one training batch. Finite weights can still
    give NaN outputs (a huge learning rate leaves weights of 1e27), hence the loss. Every rank
    calls it alike."""
    averaged = t.ema.state_dict().values() if t.ema else ()
    if not all_finite([*t.model.state_dict().values(), *averaged]):
        raise diverged(t, loop, "the weights became NaN or infinite")
    checked = [(t.evaluated, loss)] + ([(t.model, None)] if t.ema else [])  # the raw weights must be sound too
    first_batch = None
    for model, model_loss in checked:
        if model_loss is None:
            first_batch = first_batch or list(itertools.islice(t.train_loader.iter_from(0), 1))
            model_loss = evaluate_loader(model, first_batch, t.speed, t.device)[0]
        if not math.isfinite(model_loss):
            which = "averaged" if model is not t.model else "current"
            raise diverged(t, loop, f"the loss of the {which} weights is {model_loss}")


def diverged(t: Trainer, loop: LoopState, problem: str) -> TrainingDiverged:
    """The error that ends a diverged run, saying truthfully what was kept and what to do next."""
    t.loggers.diverged(loop.epoch, loop.step)
    lr = lr_at(t.config, max(loop.step - 1, 0), t.total_steps)
    lower = f"--lr {lower_lr(t.config):g}"
    kept = t.run.resumable_checkpoint()
    if kept is None:
        outcome = (f"no checkpoint was saved; lower the learning rate and start again: the same command with "
                   f"{lower} --overwrite")
    else:
        outcome = (f"the last good checkpoint {kept} is kept; lower the learning rate and start again, "
                   f"e.g. {lower} --overwrite (or another --name)")
    return TrainingDiverged(f"{problem} at epoch {loop.epoch}, step {loop.step} (lr {lr:.3g}); {outcome}")


def lower_lr(config: TrainConfig) -> float:
    """A learning rate to suggest after a divergence: a tenth, but no more than the recipe's own
    (a tenth of 1e30 would diverge as well)."""
    recipe_lr = RECIPES.get(config.preset, {}).get("lr", REFERENCE_LR)
    return min(config.lr / 10, recipe_lr)


def best_checkpoint(t: Trainer, rows: list[dict], tested: bool = True) -> dict | None:
    """The row of the epoch saved as checkpoints/best (what evaluate, predict and export use), with
    its test figures: the row's own, or, where the epochs were not tested, its weights tested now
    (unless not `tested`)."""
    if not rows:
        return None
    best = dict(max(reversed(rows), key=selection_score))  # the last of equals, as end_epoch keeps it
    if t.test_loader and "test_acc" not in best and tested:
        load_best_weights(t)
        best["test_loss"], best["test_acc"] = evaluate_loader(t.model, t.test_loader, t.speed, t.device)
    return best


def best_with_tta(t: Trainer, identity: list[torch.Tensor] | None = None) -> dict:
    """The best checkpoint's test figures with config.tta's views (flips only if the run trained with
    them), for the final report beside the plain ones: reported only, they choose nothing.
    `identity`: the best epoch's test logits where they were kept (its identity view, not run again)."""
    plan = run_plan(t.config.tta, t.config.flip, t.splits.name, t.log)
    load_best_weights(t)
    forward = loader_forward(partial(forward_pass, t.model, speed=t.speed, device=t.device), plan, t.test_loader,
                             identity)
    loss, acc = evaluate_loader(t.model, t.test_loader, t.speed, t.device, forward=forward)
    return {"tta_test_loss": loss, "tta_test_acc": acc, "tta": plan.describe()}


def kept_forward(t: Trainer, logits: list | None) -> Callable | None:
    """t.evaluated's forward for evaluate_loader, each batch's logits appended to `logits`; None
    (evaluate_loader's own forward) when they are not kept."""
    if logits is None:
        return None

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits.append(forward_pass(t.evaluated, x, t.speed, t.device))
        return logits[-1]
    return forward


def load_best_weights(t: Trainer) -> None:
    """checkpoints/best's weights (the averaged ones with --ema) into t.model: training is over, they are free."""
    from safetensors.torch import load_file

    raw, averaged = split_averaged(load_file(str(t.run.best / WEIGHTS)))
    t.model.load_state_dict(averaged or raw)


def save_last(t: Trainer, loop: LoopState, meta: dict) -> None:
    """The checkpoint to resume from: weights, optimizer, RNG and loop.epoch/batch (rank 0 writes it)."""
    if t.main:
        state = loop.training_state(t.optimizer, t.world_size, seconds=time.perf_counter() - t.started)
        save_checkpoint(t.run.last, t.model, meta | {"step": loop.step}, state, averaged=t.ema)


# ---------------------------------------------------------------------------------------------
# Set-up

def open_run(config, resume, overwrite: bool, world_size: int) -> tuple[RunDir, TrainConfig, dict | None]:
    """The run directory, the config and, when resuming, the saved training state."""
    if resume is not None:
        run = RunDir.existing(resume)
        dist.from_main(run.lock)  # held until train() returns: one process trains in a run at a time
        try:
            config = run.resumed_config(config)
            return run, config, check_training_state(run.read_state(), run.last_checkpoint() / STATE)
        except BaseException:
            run.unlock()
            raise
    if not isinstance(config, TrainConfig):
        config = resolve_config(overrides=dict(config or {}))
    config = with_absolute_paths(config)  # the saved config means the same files from any working directory
    # rank 0 names and checks it for all ranks; it is claimed (locked, written) once the data is loaded
    path = dist.agree_run_dir(lambda: RunDir.create(config, overwrite).path)
    return RunDir(path), config, None


def set_up(config: TrainConfig, run: RunDir, settings: ProcessSettings, log, on_step, started: float,
           resumed: bool = False) -> Trainer:
    """Device and speed settings, data, loaders, model and optimizer (a resumed run's weights come later)."""
    rank, world_size = dist.world()
    device = dist.local_device(pick_device(config.device))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        torch.backends.cudnn.benchmark = True  # autotune conv algorithms for the fixed input shape
    allocator = settings.apply(config, device, log)
    speed = speed_settings(config, device)
    torch.manual_seed(config.seed)

    config, splits, decisions = load_and_decide(config, world_size, log)
    mean, std = normalization(config, splits)
    crop = CENTER if splits.streamed else None
    if splits.streamed:  # photos: decoded once, at the size the centre crop of the input needs
        splits = prepare_splits(splits, storage_size(config.input_size), config, log)
    common = dict(device=device, input_size=config.input_size, mean=mean, std=std, crop=crop,
                  channels_last=speed.channels_last, rank=rank, world_size=world_size,
                  workers=stream_workers(config.workers, device))
    augment = Augment(crop_padding=0 if splits.streamed else config.crop_padding, flip=config.flip,
                      erasing=config.erasing, resized_crop=bool(splits.streamed))
    draw = sample_weights(splits.train.labels, len(splits.classes)) if config.balance == "sampling" else None
    train_loader = loader_for(splits.train, config.batch_size, shuffle=True, seed=config.seed,
                              drop_last=config.drop_last, augment=augment, draw=draw, **common)
    eval_batch = evaluation_batch(config.batch_size, config.input_size, world_size)
    val_loader = loader_for(splits.val, eval_batch, **common) if len(splits.val) else None
    test_loader = loader_for(splits.test, eval_batch, **common) if splits.test is not None and len(splits.test) else None

    model, config = build_model(config, splits, device, speed, world_size, log, resumed, decisions)
    ema = EMA(model, config.ema, config.ema_every) if config.ema else None
    optimizer = make_optimizer(config, model, world_size)
    scaler = torch.amp.GradScaler("cuda") if speed.amp_dtype == torch.float16 else None
    stored = (storage_size(config.input_size),) * 2 if splits.streamed else splits.image_size
    meta = {"classes": splits.classes, "mean": list(mean), "std": list(std), "input_size": config.input_size,
            "dataset": splits.name, "is_sample": splits.is_sample, **preprocess_meta(stored, crop)}
    weights = (class_weights(splits.train.labels, len(splits.classes)).to(device) if config.balance == "weights"
               else None)
    return Trainer(config, run, rank, world_size, device, speed, allocator, splits, train_loader, val_loader,
                   test_loader, model, optimizer, scaler, meta, started, log, on_step, decisions=decisions, ema=ema,
                   class_weights=weights)


EVAL_PIXELS = 256 * 28 * 28  # an evaluation batch: 256 Fashion-MNIST images, or as many pixels at larger inputs


def evaluation_batch(batch_size: int, input_size: int, world_size: int) -> int:
    """Evaluation batches: EVAL_PIXELS (at least the training batch), a multiple of world_size. At 224
    this is the training batch: 256 images there would take gigabytes of activations."""
    images = max(EVAL_PIXELS // (input_size * input_size), world_size)
    return max(batch_size, images // world_size * world_size)


def normalization(config: TrainConfig, splits: DataSplits) -> tuple[tuple, tuple]:
    """(mean, std) the images are normalised with: the initial weights' own where they carry them
    (ImageNet's for ImageNet weights), else the training set's (data.stats_of), or none (normalize off)."""
    channels = splits.train.channels
    if not config.normalize:
        return (0.0,) * channels, (1.0,) * channels
    if config.init_from:
        from .pretrained import expected_stats, load_init

        _, weights_meta = load_init(config.init_from, log=lambda *a, **k: None)
        stats = expected_stats(weights_meta, channels)
        if stats is not None:
            return stats
    return splits.mean, splits.std


def prepare_splits(splits: DataSplits, size: int, config: TrainConfig, log) -> DataSplits:
    """Streamed splits with their pixels in the prepared cache at size x size (data/prepared.py); under
    torchrun rank 0 decodes, the others wait and read the same cache."""
    from .data.prepared import prepare_datasets

    prepared = dist.from_main(lambda: prepare_datasets(
        {"train": splits.train, "val": splits.val, "test": splits.test}, (size, size), skip_bad=config.skip_bad,
        workers=stream_workers(config.workers), progress=sys.stderr.isatty(), log=log))
    return dataclasses.replace(splits, **prepared)


def load_and_decide(config: TrainConfig, world_size: int, log) -> tuple[TrainConfig, DataSplits, dict]:
    """The data, the config's FROM_THE_DATA fields decided from it (decide.py), then the validation
    split and the limit carved as decided; nothing is written before this has checked the data."""
    splits = load_data(config.data, data_dir=config.data_dir, val_size=0, seed=config.seed,
                       allow_sample=config.allow_sample, skip_bad=config.skip_bad, test_limit=config.test_limit,
                       streaming=config.streaming, log=log)
    if config.arch is None:  # from the initial weights: their network bounds what decide() picks
        from .pretrained import load_init

        weights, _ = load_init(config.init_from, log=lambda *a, **k: None)
        shape = weights.config()
        config = dataclasses.replace(config, arch=shape["arch"], ratio=1,
                                     **{key: shape[key] for key in ("fc_width", "batch_norm")
                                        if getattr(config, key) is None})
    config, decisions = decide(config, splits, world_size)
    if splits.streamed:
        decisions["streaming"] = f"{splits.streamed}; --streaming off holds them in memory"
    dist.check_batch_size(config.batch_size, world_size)
    return config, carve(splits, config.val_size, config.limit, config.seed), decisions


def build_model(config: TrainConfig, splits: DataSplits, device: torch.device, speed: Speed, world_size: int,
                log, resumed: bool, decisions: dict | None = None) -> tuple[torch.nn.Module, TrainConfig]:
    """The config's VGG, or a new run's initial weights (config.init_from) fitted to the data, with
    config.freeze blocks frozen; returns it and the config naming the architecture it has. A network
    whose training step cannot fit the device (bounds.py) is refused before it is built."""
    channels, num_classes = splits.train.channels, len(splits.classes)
    if config.init_from and not resumed:  # a resumed run rebuilds the saved architecture; restore() loads it
        model, config = initial_model(config, channels, num_classes, log)  # its weights: as large as their file
        check_training_fits(config, model.config(), device, speed.amp_dtype, world_size, decisions)
    else:
        check_training_fits(config, config.model_arguments(channels, num_classes), device, speed.amp_dtype,
                            world_size, decisions)
        model = config.build_model(channels, num_classes)
        freeze_blocks(model, config.freeze, log)
    set_kernels(model, speed.kernels)
    model = model.to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1 and model.batch_norm:
        model = dist.convert_sync_batchnorm(model, device)
    return model, config


def initial_model(config: TrainConfig, channels: int, num_classes: int, log) -> tuple[torch.nn.Module, TrainConfig]:
    """pretrained.init_model on config.init_from; the config returned names the architecture of the weights."""
    model, _ = init_model(config.init_from, num_classes=num_classes, in_channels=channels,
                          input_size=config.input_size, head_pool=config.head_pool, freeze=config.freeze, log=log,
                          arch=config.arch, ratio=config.ratio, fc_width=config.fc_width,
                          batch_norm=config.batch_norm, dropout=config.dropout, init=config.init)
    shape = model.config()
    source = Path(config.init_from)
    source = str(source.resolve()) if source.exists() else config.init_from  # the saved config names it wherever run
    log(f"initial weights: {source} (blocks {shape['arch']}, fc width {shape['fc_width']}, "
        f"batch norm {'on' if shape['batch_norm'] else 'off'}, head pool {shape['head_pool']})")
    return model, dataclasses.replace(config, init_from=source, arch=shape["arch"], ratio=1,
                                      fc_width=shape["fc_width"], batch_norm=shape["batch_norm"],
                                      head_pool=shape["head_pool"])


def fresh_sums(t: Trainer) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64, device=t.device)


def restore(t: Trainer, state: dict) -> LoopState:
    """Weights (the averaged ones too), optimizer, RNG and position from the run's last checkpoint
    (its weights checked against the run's network first: checkpoint.check_weights)."""
    check_weights(t.run.last_checkpoint() / WEIGHTS, t.model.state_dict(), network="this run's network")
    raw, averaged = split_averaged(t.run.read_weights())
    t.model.load_state_dict(raw)
    if t.ema and averaged is None:
        t.log("the checkpoint holds no averaged weights: the average starts again from its weights")
        t.ema = EMA(t.model, t.ema.decay, t.ema.every)
    elif t.ema:
        t.ema.load_state_dict(averaged)
    try:
        t.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if t.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise VggkitError(f"training state {t.run.last_checkpoint() / STATE} does not fit this run's optimizer "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): the checkpoint is "
                          "damaged; start a new run or restore the file") from None
    seconds = state.get("seconds", 0.0)
    loop = LoopState(
        # the saved sums are global (reduced before saving): one rank carries them on
        sums=state["sums"].to(t.device) if t.main else fresh_sums(t),
        history=History(t.run.path, epochs=json.loads(state["history"]), seconds=seconds),
        epoch=state["epoch"], batch=state["batch"], step=state["step"], best_val=state["best_val"],
        seconds_before=seconds)
    # a run can be resumed with another number of processes: continue from the epoch start then
    saved_world_size = state.get("world_size", 1)
    if saved_world_size != t.world_size and loop.batch:
        t.log(f"resumed with {t.world_size} processes instead of {saved_world_size}: "
              f"epoch {loop.epoch} restarts from its first batch")
        loop.batch, loop.sums = 0, fresh_sums(t)
        loop.step = (loop.epoch - 1) * len(t.train_loader)
    t.log(f"resuming {t.run.path} at epoch {loop.epoch}, batch {loop.batch}")
    return loop


def parallel_and_compiled(t: Trainer, step: int) -> torch.nn.Module:
    """The model the steps run: under DDP with several processes, compiled when the speed settings say so."""
    model = t.model
    if t.world_size > 1:
        torch.manual_seed(dist.rank_seed(t.config.seed, step))  # dropout: a different stream on each rank
        model = torch.nn.parallel.DistributedDataParallel(
            t.model, device_ids=[t.device.index] if t.device.type == "cuda" else None)
    return torch.compile(model) if t.speed.compile else model


def start(t: Trainer, loop: LoopState, resumed: bool) -> None:
    """Write the run's config and tell the loggers the run begins."""
    if t.main:
        save_config(t.config, t.run.config_path)
    splits = t.splits
    t.loggers.start(RunStart(
        run=t.run, resumed=resumed, epochs=t.config.epochs, batches=len(t.train_loader),
        history=list(loop.history.epochs), dataset=splits.name, source=splits.source, is_sample=splits.is_sample,
        device=t.device, speed=t.speed.describe(), threads=torch.get_num_threads(), allocator=t.allocator,
        world_size=t.world_size, parameters=sum(p.numel() for p in t.model.parameters()),
        images=(len(splits.train), len(splits.val), len(splits.test) if splits.test is not None else 0),
        input_size=t.config.input_size, batch_size=t.config.batch_size, lr=t.config.lr,
        augment=augmentations(t.config, bool(splits.streamed)),
        decisions=t.decisions, averaging=t.ema.describe() if t.ema else "", tta=t.config.tta))


def augmentations(config: TrainConfig, streamed: bool = False) -> tuple[str, ...]:
    """The training augmentations, for the header line (streamed photos take a random-resized crop)."""
    crop = ("random-resized crop", True) if streamed else (f"crop {config.crop_padding}", config.crop_padding)
    return tuple(name for name, on in (crop, ("flip", config.flip),
                                       (f"erasing {config.erasing:g}", config.erasing)) if on)
