"""The epoch loop, top to bottom: `for epoch: train_one_epoch(); end_epoch()`, then finish(); a stop
request (SIGINT/SIGTERM) ends it through interrupt(). What a run works with is a Trainer, where it is a
LoopState (both from trainer.py).

Everything the run tells the world goes through its loggers (loggers.py); its files are named by
rundir.py. Weights are saved only when they and their loss are finite (check_saveable): a diverged
run never leaves a NaN model behind as its last or best checkpoint. With weight averaging (--ema,
ema.py) the average is updated after every step taken, the epochs are evaluated with it (so it picks
the best checkpoint), and checkpoints hold it beside the raw weights.
"""
from __future__ import annotations

import itertools
import math
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from . import distributed as dist
from .checkpoint import all_finite, save_checkpoint, split_averaged
from .config import RECIPES, TrainConfig, save_config
from .decide import REFERENCE_LR
from .errors import VggkitError
from .inference import forward_pass
from .loggers import Interruption, RunEnd, RunStart
from .optim import lr_at, set_lr
from .rundir import WEIGHTS
from .runtime import in_main_thread
from .steps import evaluate_loader, train_step
from .tta import loader_forward, run_plan
from .trainer import History, LoopState, Trainer


PROGRESS_EVERY = 20  # steps between reads of the running loss (each one waits for the device)


class TrainingDiverged(VggkitError):
    """The loss or the weights became NaN or infinite."""


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
class EpochRun:
    seconds: float  # from the epoch's first step to its last
    images: int  # this process's images



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
