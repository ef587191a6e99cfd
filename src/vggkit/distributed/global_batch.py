"""The global batch (--batch-size) split across ranks: its size must divide by their number, each
rank's loss is weighted so that DDP's gradient average is the gradient of the global mean, and each
rank draws its own dropout masks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import VggkitError
from .collectives import world


def check_batch_size(batch_size: int, world_size: int) -> None:
    """The global batch is split evenly across ranks: it must divide by their number."""
    if world_size <= 1 or batch_size % world_size == 0:
        return
    below = batch_size // world_size * world_size
    above = below + world_size
    sizes = " or ".join(str(b) for b in (below, above) if b > 0)
    counts = [n for n in range(2, min(batch_size, 64) + 1) if batch_size % n == 0][:6]
    procs = f", or a number of processes that divides {batch_size} ({', '.join(map(str, counts))})" if counts else ""
    raise VggkitError(f"batch size {batch_size} (the global batch, split across processes) does not divide by "
                      f"{world_size} processes; use --batch-size {sizes}{procs}")


def batch_loss(logits: torch.Tensor, y: torch.Tensor, global_count: int, label_smoothing: float = 0.0,
               class_weights: torch.Tensor | None = None):
    """(loss to back-propagate, sum of the per-image losses of this rank's part).

    One process: the mean cross-entropy. Several: this rank's loss sum times world / global_count,
    so that DDP's average of the ranks' gradients is the gradient of the mean over the global batch
    however unevenly the batch was split (a rank with no images contributes zero).
    class_weights (balance.class_weights, mean 1 over the training set): each image's loss times its
    class's weight, still divided by the images (not by the weights' sum), so one process and several
    agree; the sum returned, for the figures, is of the unweighted losses.
    """
    world_size = world()[1]
    if class_weights is not None:
        per_image = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
        weighted = (per_image * class_weights[y]).sum()
        scale = 1 / max(len(y), 1) if world_size == 1 else world_size / max(global_count, 1)
        return weighted * scale, per_image.sum()
    if world_size == 1:
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, loss * len(y)
    loss_sum = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    return loss_sum * (world_size / max(global_count, 1)), loss_sum


def rank_seed(seed: int, step: int) -> int:
    """A seed for this rank's torch RNG (dropout): distinct per rank, a function of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed % 2**64, world()[0], step, 7]).generate_state(1, np.uint64)[0] % 2**63)
