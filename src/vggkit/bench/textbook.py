"""The textbook loop that `vggkit bench --compare` measures vggkit against: the d2l book's training
loop for VGG on Fashion-MNIST. Its data pipeline resizes each image on its own (PIL bilinear, then
ToTensor, as transforms.Resize + ToTensor in a DataLoader, here in the main process) and stacks the
batch; its step is float32, NCHW and eager (SGD lr 0.05, cross-entropy) on the same network (every
layer in order, PyTorch's ops: kernels "plain"), with glibc's allocator and denormal floats as a
fresh Python process has them.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from .. import allocator as alloc
from ..config import TrainConfig
from ..data import Dataset
from ..model import set_kernels

TEXTBOOK_LR = 0.05
TEXTBOOK_SETTINGS = f"fp32, NCHW, eager; per-sample PIL resize + ToTensor; SGD lr {TEXTBOOK_LR}; default allocator"


class TextbookBatches:
    """The d2l data pipeline: each 28x28 uint8 image -> PIL -> Image.resize(BILINEAR) -> ToTensor
    (float32 in [0, 1], C x H x W), one at a time, then the batch stacked (default_collate)."""

    def __init__(self, dataset: Dataset, batch_size: int, size: int, seed: int):
        self.images, self.labels = dataset.images, np.asarray(dataset.labels)
        self.batch_size, self.size = batch_size, size
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(self.labels)), 0
        self.seconds, self.batches = 0.0, 0

    def next(self):
        from PIL import Image

        start = time.perf_counter()
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.labels)), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        samples = []
        for i in idx:
            array = self.images[i]
            img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # ToTensor: HWC uint8 -> CHW float / 255
            t = t.view(self.size, self.size, -1).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
            samples.append(t)
        x = torch.stack(samples)
        y = torch.as_tensor(self.labels[idx], dtype=torch.int64)
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return x, y

    @property
    def seconds_per_batch(self) -> float:
        return self.seconds / max(self.batches, 1)


class TextbookSteps:
    """The book's training and inference steps, on the network `config` describes (built from `seed`)."""

    def __init__(self, config: TrainConfig, device: torch.device, dataset: Dataset, seed: int):
        torch.manual_seed(seed)
        self.device = device
        self.model = config.build_model(dataset.channels, 10).to(device)
        set_kernels(self.model, "plain")  # the book's network: every layer in order, PyTorch's ops
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=TEXTBOOK_LR)
        self.loss = torch.nn.CrossEntropyLoss()
        self.batches = TextbookBatches(dataset, config.batch_size, config.input_size, seed)

    def settings(self):
        return textbook_settings(self.device)

    def mode(self, training: bool) -> None:
        """Nothing to do: each of the book's steps sets the model's mode itself."""

    def train_step(self) -> int:
        x, y = self.batches.next()
        x, y = x.to(self.device), y.to(self.device)
        self.model.train()
        self.optimizer.zero_grad()
        y_hat = self.model(x)
        loss = self.loss(y_hat, y)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # d2l's metric.add(l * n, accuracy(y_hat, y), n): float() of each
            float(loss * x.shape[0]), float((y_hat.argmax(1) == y).sum()), x.shape[0]
        return len(y)

    @torch.no_grad()
    def infer_step(self) -> int:
        x, y = self.batches.next()
        x, y = x.to(self.device), y.to(self.device)
        self.model.eval()
        float((self.model(x).argmax(1) == y).sum())
        return len(y)


@contextmanager
def textbook_settings(device: torch.device):
    """The textbook loop runs as a fresh process would: glibc's default allocator, denormals kept."""
    with alloc.allocator("default"):
        if device.type == "cpu":
            torch.set_flush_denormal(False)
        try:
            yield
        finally:
            if device.type == "cpu":
                torch.set_flush_denormal(True)  # back to vggkit's setting (ProcessSettings)
