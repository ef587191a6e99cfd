"""The training loop, top to bottom: config -> data -> model -> steps -> run directory.

    history = vggkit.train({"preset": "fast", "epochs": 5})
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import STATE, atomic_write_text, save_checkpoint
from .config import TrainConfig, load_config, resolve_config, save_config
from .data import load_data
from .errors import VggkitError
from .pipeline import Augment, BatchLoader
from .runtime import ProcessSettings, in_main_thread, pick_device, speed_settings
from .steps import evaluate_loader, train_step


class TrainingDiverged(VggkitError):
    """The loss became NaN or infinite."""


@dataclass
class History:
    run_dir: Path
    epochs: list[dict] = field(default_factory=list)
    test_acc: float | None = None
    test_loss: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0
    interrupted: bool = False


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the step, so resuming needs only the step count

def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.schedule == "none":
        return config.lr
    progress = min(step / max(1, total_steps), 1.0)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    # one-cycle: linear warm-up from lr/10 to lr, then linear decay to 0
    if progress < config.warmup:
        return config.lr * (0.1 + 0.9 * progress / config.warmup)
    return config.lr * (1 - progress) / (1 - config.warmup)


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # no weight decay on biases and batch-norm parameters
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=config.lr)


# ---------------------------------------------------------------------------------------------
# Run directory

def prepare_run_dir(config: TrainConfig, overwrite: bool) -> Path:
    name = config.name or f"{config.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.out) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise VggkitError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                              "--overwrite to replace it, or another --name")
        import shutil
        shutil.rmtree(run_dir)
    return run_dir


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


# ---------------------------------------------------------------------------------------------
# The loop

def train(config: TrainConfig | dict | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: str = "auto", log=print, on_step=None) -> History:
    """Train a VGG; returns the history. `progress`: auto (bar on a TTY), bar, lines or none.

    `config` is a TrainConfig or a dict of its fields (a "preset" key picks the base preset).
    `resume` is a run directory to continue; `on_step(step)` is called after every step.
    The process-wide settings it changes (threads, denormals, the CPU allocator) are put back on return.
    """
    with ProcessSettings() as settings:
        return _train(config, resume, overwrite, progress, log, on_step, settings)


def _train(config, resume, overwrite, progress, log, on_step, settings: ProcessSettings) -> History:
    started = time.perf_counter()
    dist.init_from_env()  # under torchrun: join the process group (a plain process: no-op)
    rank, world_size = dist.world()
    main = rank == 0
    if not main:
        log = lambda *a, **k: None  # noqa: E731  only rank 0 speaks
        progress = "none"

    state = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.toml").is_file():
            raise VggkitError(f"{run_dir} is not a vggkit run (no config.toml); give the run directory to resume")
        config = _resumed_config(run_dir, config)
        state = _load_state(run_dir)
    else:
        if not isinstance(config, TrainConfig):
            config = resolve_config(overrides=dict(config or {}))
        dist.check_batch_size(config.batch_size, world_size)
        run_dir = dist.agree_run_dir(lambda: prepare_run_dir(config, overwrite))  # rank 0 names it for all ranks

    device = dist.local_device(pick_device(config.device))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        torch.backends.cudnn.benchmark = True  # autotune conv algorithms for the fixed input shape
    allocator = settings.apply(config, device)
    speed = speed_settings(config, device)
    torch.manual_seed(config.seed)

    # data
    splits = load_data(config.data, data_dir=config.data_dir, val_size=config.val_size, seed=config.seed,
                       allow_sample=config.allow_sample, skip_bad=config.skip_bad, limit=config.limit,
                       test_limit=config.test_limit, log=log)
    channels = splits.train.channels
    mean, std = (splits.mean, splits.std) if config.normalize else ((0.0,) * channels, (1.0,) * channels)
    common = dict(device=device, input_size=config.input_size, mean=mean, std=std,
                  channels_last=speed.channels_last, rank=rank, world_size=world_size)
    augment = Augment(crop_padding=config.crop_padding, flip=config.flip, erasing=config.erasing)
    train_loader = BatchLoader(splits.train, config.batch_size, shuffle=True, seed=config.seed,
                               drop_last=config.drop_last, augment=augment, **common)
    eval_batch = max(config.batch_size, 256 // world_size * world_size)
    val_loader = BatchLoader(splits.val, eval_batch, **common) if len(splits.val) else None
    test_loader = BatchLoader(splits.test, eval_batch, **common) if splits.test is not None and len(splits.test) else None

    # model
    model = config.build_model(channels, len(splits.classes)).to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1 and config.batch_norm:
        model = dist.convert_sync_batchnorm(model, device)
    optimizer = make_optimizer(config, model)
    scaler = torch.amp.GradScaler("cuda") if speed.amp_dtype == torch.float16 else None
    meta = {"classes": splits.classes, "mean": list(mean), "std": list(std), "input_size": config.input_size,
            "dataset": splits.name, "is_sample": splits.is_sample}

    history = History(run_dir)
    start_epoch, start_batch, step, best_val = 1, 0, 0, -1.0
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if state is not None:
        model.load_state_dict(_weights(run_dir))
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        best_val, history.epochs = state["best_val"], json.loads(state["history"])
        history.seconds = state.get("seconds", 0.0)
        # the saved sums are global (reduced before saving): one rank carries them on
        sums = state["sums"].to(device) if rank == 0 else torch.zeros_like(sums)
        # a run can be resumed with another number of processes: continue from the epoch start then
        if state.get("world_size", 1) != world_size and start_batch:
            log(f"resumed with {world_size} processes instead of {state.get('world_size', 1)}: "
                f"epoch {start_epoch} restarts from its first batch")
            start_batch, sums = 0, torch.zeros_like(sums)
            step = (start_epoch - 1) * len(train_loader)
        log(f"resuming {run_dir} at epoch {start_epoch}, batch {start_batch}")

    ddp_model = model
    if world_size > 1:
        torch.manual_seed(dist.rank_seed(config.seed, step))  # dropout: a different stream on each rank
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(ddp_model) if speed.compile else ddp_model

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.toml")
        _log_event(run_dir, {"event": "resume" if state else "start", "time": datetime.now().isoformat(timespec="seconds")})
    log(f"vggkit: {splits.name} ({splits.source}){' [bundled sample: accuracy not comparable to published figures]' if splits.is_sample else ''}")
    log(f"device: {device} ({speed.describe()}"
        f"{f', {torch.get_num_threads()} threads, {allocator} allocator' if device.type == 'cpu' else ''})"
        f"{f', {world_size} processes' if world_size > 1 else ''}; train {len(splits.train)}, "
        f"val {len(splits.val)}, test {len(splits.test) if splits.test is not None else 0} images; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; run dir {run_dir}")

    total_steps = config.epochs * len(train_loader)
    show_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
    train_seconds, train_images = 0.0, 0

    with StopRequest() as stop:
        for epoch in range(start_epoch, config.epochs + 1):
            model.train()
            train_loader.set_epoch(epoch)
            first = start_batch if epoch == start_epoch else 0
            if epoch != start_epoch:
                sums.zero_()
            bar = tqdm(total=len(train_loader), initial=first, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                       disable=not show_bar, leave=False, dynamic_ncols=True)
            epoch_start = time.perf_counter()
            images_this_run = 0
            for batch_index, (x, y) in enumerate(train_loader.iter_from(first), start=first):
                lr = lr_at(config, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                global_count = min(config.batch_size, len(splits.train) - batch_index * config.batch_size)
                train_step(step_model, optimizer, scaler, speed, x, y, sums,
                           lambda logits, y: dist.batch_loss(logits, y, global_count, config.label_smoothing))
                step += 1
                images_this_run += len(y)
                if step % 20 == 0 or batch_index + 1 == len(train_loader):
                    loss_sum, correct, count = sums.tolist()  # one device sync per 20 steps
                    if not math.isfinite(loss_sum):
                        bar.close()
                        _log_event(run_dir, {"event": "diverged", "epoch": epoch, "step": step}) if main else None
                        raise TrainingDiverged(
                            f"loss became {loss_sum / max(count, 1)} at epoch {epoch}, step {step} (lr {lr:.3g}); "
                            f"lower the learning rate, e.g. --lr {config.lr / 10:g}; the last good checkpoint is kept")
                    elapsed = time.perf_counter() - epoch_start
                    bar.set_postfix_str(f"loss {loss_sum / count:.3f} acc {correct / count:.3f} "
                                        f"{images_this_run * world_size / max(elapsed, 1e-9):.0f} img/s")
                bar.update(1)
                if on_step:
                    on_step(step)
                if dist.agree_stop(stop) is not None and batch_index + 1 < len(train_loader):  # all ranks agree
                    bar.close()
                    dist.all_reduce_sum(sums)
                    _save(run_dir, "last", model, optimizer, meta, epoch, batch_index + 1, step, sums, best_val,
                          history, world_size, main, time.perf_counter() - started)
                    name = signal.Signals(stop.signal).name
                    _log_event(run_dir, {"event": "interrupted", "signal": name, "epoch": epoch, "step": step}) if main else None
                    log(f"{name}: saved a checkpoint at epoch {epoch}, step {step}; "
                        f"resume with: vggkit train --resume {run_dir}")
                    history.interrupted = True
                    return history
            bar.close()
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            train_images += images_this_run * world_size
            dist.all_reduce_sum(sums)
            loss_sum, correct, count = sums.tolist()
            row = {"epoch": epoch, "train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1)}
            if val_loader:
                row["val_loss"], row["val_acc"] = evaluate_loader(model, val_loader, speed, device)
            if test_loader and config.eval_every_epoch_on_test:
                row["test_loss"], row["test_acc"] = evaluate_loader(model, test_loader, speed, device)
            row.update(lr=lr_at(config, step, total_steps), seconds=round(epoch_seconds, 3),
                       images_per_s=round(images_this_run * world_size / epoch_seconds, 1),
                       elapsed=round(time.perf_counter() - started + (state or {}).get("seconds", 0.0), 2))
            history.epochs.append(row)
            score = row.get("val_acc", row["train_acc"])
            is_best = score > best_val
            best_val = max(best_val, score)
            _save(run_dir, "last", model, optimizer, meta | {"epoch": epoch, **_accs(row)}, epoch + 1, 0, step,
                  torch.zeros_like(sums), best_val, history, world_size, main, time.perf_counter() - started)
            if is_best and main:
                save_checkpoint(run_dir / "checkpoints" / "best", model, meta | {"epoch": epoch, **_accs(row)})
            if main:
                _write_metrics(run_dir, history.epochs)
                _log_event(run_dir, {"event": "epoch", **row})
            log(_epoch_line(row, config.epochs))
            if dist.agree_stop(stop) is not None and epoch < config.epochs:
                name = signal.Signals(stop.signal).name
                log(f"{name}: saved a checkpoint after epoch {epoch}; resume with: vggkit train --resume {run_dir}")
                history.interrupted = True
                return history

    history.seconds = time.perf_counter() - started + (state.get("seconds", 0.0) if state else 0.0)
    history.images_per_s = train_images / train_seconds if train_seconds else 0.0
    if test_loader:
        history.test_loss, history.test_acc = (history.epochs[-1]["test_loss"], history.epochs[-1]["test_acc"]) \
            if "test_acc" in history.epochs[-1] else evaluate_loader(model, test_loader, speed, device)
    last = history.epochs[-1] if history.epochs else {}
    if main:
        _log_event(run_dir, {"event": "end", "test_acc": history.test_acc, "seconds": round(history.seconds, 2),
                             "images_per_s": round(history.images_per_s, 1)})
        _plot_curves(run_dir, history.epochs)
    if last:
        log(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}"
            + (f", test acc {history.test_acc:.3f}" if history.test_acc is not None else ""))
    log(f"{history.images_per_s:.1f} examples/sec on {device}; total {history.seconds:.1f} s; run dir {run_dir}")
    return history


def _accs(row: dict) -> dict:
    return {k: row[k] for k in ("train_acc", "val_acc", "test_acc") if k in row}


def _epoch_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}", f"train acc {row['train_acc']:.4f}"]
    if "val_acc" in row:
        parts.append(f"val acc {row['val_acc']:.4f}")
    if "test_acc" in row:
        parts.append(f"test acc {row['test_acc']:.4f}")
    parts.append(f"{row['seconds']:.1f} s ({row['images_per_s']:.0f} img/s)")
    return ", ".join(parts)


def _save(run_dir, which, model, optimizer, meta, epoch, batch, step, sums, best_val, history, world_size, main, seconds):
    if not main:
        return
    state = {
        "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "epoch": epoch, "batch": batch, "step": step, "sums": sums.cpu(), "best_val": best_val,
        "history": json.dumps(history.epochs), "world_size": world_size, "seconds": seconds,
    }
    save_checkpoint(run_dir / "checkpoints" / which, model, meta | {"step": step}, state)


def _load_state(run_dir: Path) -> dict:
    directory = _last_checkpoint(run_dir)
    try:
        return torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise VggkitError(f"cannot read training state {directory / STATE} ({type(e).__name__}); "
                          "the checkpoint is damaged: start a new run or restore the file") from None


def _last_checkpoint(run_dir: Path) -> Path:
    for directory in (run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "last.prev"):
        if (directory / STATE).is_file():
            return directory
    raise VggkitError(f"{run_dir} has no checkpoint to resume from (checkpoints/last is missing); start a new run")


def _weights(run_dir: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _last_checkpoint(run_dir) / "model.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise VggkitError(f"cannot read weights {path} ({e}); the checkpoint is damaged") from None


RESUMABLE = {"epochs", "device", "threads"}


def _resumed_config(run_dir: Path, overrides) -> TrainConfig:
    config = load_config(run_dir / "config.toml")
    overrides = overrides.to_dict() if isinstance(overrides, TrainConfig) else dict(overrides or {})
    for key, value in overrides.items():
        if value is None or key == "preset":
            continue
        if key not in RESUMABLE and getattr(config, key, value) != value:
            raise VggkitError(f"a resumed run keeps its config ({run_dir / 'config.toml'}); drop the {key} option "
                              f"(only {', '.join(sorted(RESUMABLE))} may change)")
        setattr(config, key, value)
    return config


def _write_metrics(run_dir: Path, rows: list[dict]) -> None:
    keys = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds",
            "images_per_s", "elapsed"]
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r[k], float)
                                         else str(r[k]) for k in keys) for r in rows]
    atomic_write_text(run_dir / "metrics.csv", "\n".join(lines) + "\n")


def _log_event(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _plot_curves(run_dir: Path, rows: list[dict]) -> None:
    """The textbook's plot: train loss, train acc, val and test acc against epoch."""
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for key, style in (("train_loss", "-"), ("train_acc", "--"), ("val_acc", "-."), ("test_acc", ":")):
        if all(key in r for r in rows):
            ax.plot(epochs, [r[key] for r in rows], style, marker="o", markersize=3, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_xlim(0.5, max(epochs) + 0.5)
    fig.tight_layout()
    atomic_write(run_dir / "curves.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
