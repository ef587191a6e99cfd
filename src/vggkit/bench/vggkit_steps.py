"""vggkit's contender in a bench: its real training step (steps.train_step with the recipe's
optimizer, loss and augmentation) and its inference step, on one model. measure.py times it against
the textbook loop (textbook.py); data.py times it on streamed photos against synthetic batches."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..config import TrainConfig
from ..data import Dataset
from ..distributed import batch_loss
from ..inference import InferenceRunner
from ..model import set_kernels
from ..optim import make_optimizer
from ..pipeline import Augment, BatchLoader
from ..runtime import Speed
from ..steps import train_step

NUM_CLASSES = 10


class VggkitSteps:
    """vggkit's real training step (steps.train_step with the recipe's optimizer, loss and augmentation)
    and its inference step, on one model."""

    def __init__(self, config: TrainConfig, speed: Speed, device: torch.device, dataset: Dataset | None, seed: int,
                 relu_inplace: bool = True, loader=None):
        """Batches of `dataset` in memory (unnormalised), or of `loader` (e.g. a stream.StreamLoader) as it is."""
        self.speed, self.device, self.label_smoothing = speed, device, config.label_smoothing
        torch.manual_seed(seed)
        channels = loader.channels if loader is not None else dataset.channels
        if loader is None:
            plain = dict(mean=(0.0,) * channels, std=(1.0,) * channels)
            augment = Augment(crop_padding=config.crop_padding, flip=config.flip, erasing=config.erasing)
            loader = BatchLoader(dataset, config.batch_size, device=device, input_size=config.input_size, **plain,
                                 shuffle=True, seed=seed, drop_last=True, augment=augment,
                                 channels_last=speed.channels_last)
            eval_loader = BatchLoader(dataset, config.batch_size, device=device, input_size=config.input_size,
                                      **plain, drop_last=True, channels_last=speed.channels_last)
        else:
            eval_loader = loader
        self.model = _vggkit_model(config, channels, device, speed, relu_inplace)
        self.kernels = set_kernels(self.model, speed.kernels)  # what the blocks really run
        self.optimizer = make_optimizer(config, self.model)
        self.step_model = torch.compile(self.model) if speed.compile else self.model
        self.eager_infer = InferenceRunner(self.model, speed, device, batch_size=config.batch_size, compile="off")
        # asked to compile (--compile on): inference is timed compiled as well as eagerly
        self.compiled_infer = InferenceRunner(self.model, speed, device, batch_size=config.batch_size,
                                              compile="on") if speed.compile else None
        self.scaler = torch.amp.GradScaler("cuda") if speed.amp_dtype == torch.float16 else None
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.train_batches = _cycle(loader)
        self.eval_batches = _cycle(eval_loader)

    def settings(self):
        return nullcontext()  # bench() has set vggkit's process settings

    def mode(self, training: bool) -> None:
        self.model.train(training)

    def train_step(self) -> int:
        return self.step_on(*self.next_batch())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.train_batches)

    def step_on(self, x: torch.Tensor, y: torch.Tensor) -> int:
        train_step(self.step_model, self.optimizer, self.scaler, self.speed, x, y, self.sums, self._loss)
        return len(y)

    def infer_step(self, runner: InferenceRunner | None = None) -> int:
        """One batch of inference: eager, or by `runner` (compiled_infer)."""
        x, y = next(self.eval_batches)
        logits = (runner or self.eager_infer)(x)
        (logits.argmax(1) == y).sum()
        return len(y)

    def compiled_infer_step(self) -> int:
        return self.infer_step(self.compiled_infer)

    def loss_is_finite(self) -> bool:
        return math.isfinite(self.sums[0].item())

    def _loss(self, logits: torch.Tensor, y: torch.Tensor):
        return batch_loss(logits, y, len(y), self.label_smoothing)


def _vggkit_model(config: TrainConfig, channels: int, device: torch.device, speed: Speed,
                  relu_inplace: bool) -> torch.nn.Module:
    model = config.build_model(channels, NUM_CLASSES).to(device)
    if not relu_inplace:
        for m in model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _cycle(loader: BatchLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
