"""One training step and one pass of evaluation: the inner loops shared by training, evaluation
and the benchmarks."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from . import distributed as dist
from .inference import forward_pass
from .runtime import Speed, autocast


@torch.no_grad()
def evaluate_loader(model, loader, speed: Speed, device: torch.device, want_predictions: bool = False,
                    forward=None):
    """Mean loss, accuracy and (optionally) predicted labels over a loader, summed across ranks.
    forward(x): how the model runs a batch (an inference.InferenceRunner, or tta.tta_forward over one;
    default: eagerly)."""
    model.eval()
    forward = forward or partial(forward_pass, model, speed=speed, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    predictions = []
    for x, y in loader:
        logits = forward(x)
        sums += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double(), torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
        if want_predictions:
            predictions.append(logits.argmax(1).cpu())
    dist.all_reduce_sum(sums)
    loss, correct, count = sums.tolist()
    result = (loss / max(count, 1), correct / max(count, 1))
    return (*result, torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)) if want_predictions else result


def train_step(model, optimizer, scaler, speed: Speed, x, y, sums: torch.Tensor, loss_fn) -> None:
    """One optimisation step. `loss_fn(logits, y)` -> (loss to back-propagate, sum of the per-image
    losses); adds (that sum, correct predictions, images) to `sums` without a device sync."""
    with autocast(x.device, speed):
        logits = model(x)
        loss, loss_sum = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        sums += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), device=sums.device, dtype=torch.float64)])
