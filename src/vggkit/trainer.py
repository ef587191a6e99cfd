"""What a run works with and where it is: set_up() builds a Trainer from the config (device, data and
the defaults decided from it, loaders, model, optimizer), restore() a LoopState from a run's last
checkpoint. train.py calls these; the epoch loop (loop.py) runs on what they return."""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import distributed as dist
from .balance import class_weights, sample_weights
from .bounds import check_training_fits
from .checkpoint import check_weights, split_averaged
from .config import TrainConfig
from .data import load_data
from .data.carve import carve
from .decide import decide
from .ema import EMA
from .errors import VggkitError
from .loggers import Logger, Loggers
from .model import set_kernels
from .optim import make_optimizer
from .pipeline import Augment, Batches
from .stream import loader_for, stream_workers
from .pretrained import freeze_blocks, init_model
from .rundir import STATE, WEIGHTS, RunDir
from .preprocess import CENTER, preprocess_meta, storage_size
from .runtime import ProcessSettings, Speed, pick_device, speed_settings

if TYPE_CHECKING:
    from .data import DataSplits


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


def fresh_sums(t: Trainer) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64, device=t.device)


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
