"""Small helpers shared by the tests (tests/ is on sys.path under pytest's default import mode)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vggkit.checkpoint import load_model
from vggkit.cli import main

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}  # the memory layouts kernels take
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def require_kernels() -> None:
    """Skip where vggkit's C++ kernels are switched off or cannot be built (no compiler); else build
    (or load from the cache) and check them: the fused-kernel test modules' fixtures call it."""
    from vggkit import kernels
    from vggkit.kernels import build

    if os.environ.get(build.SWITCH, "").lower() == "plain":
        pytest.skip(f"{build.SWITCH}=plain: this run tests the plain path only")
    if shutil.which(build.compiler()) is None:
        pytest.skip(f"no C++ compiler ({build.compiler()}) to build the fast CPU kernels")
    assert kernels.available(), build.LIBRARY.reason


def backward_ops(output: torch.Tensor) -> list[str]:
    """The type names of the autograd nodes behind `output` (each node once): which fused functions
    a forward pass recorded."""
    seen, todo = [], [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.append(node)
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return [type(node).__name__ for node in seen]


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str):
    """Loss and parameter gradients (name -> gradient) of one training step, in float32 or under bf16
    autocast (precision "fp32" or "bf16")."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def like_trained(model: nn.Module, weight_noise: float = 0.0) -> nn.Module:
    """`model` in eval mode with batch-norm statistics away from their defaults (and, with
    weight_noise, weights moved off their init), as a trained network's would be."""
    with torch.no_grad():
        if weight_noise:
            for p in model.parameters():
                p.add_(torch.randn_like(p) * weight_noise)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def assert_no_further_off(ours: dict, theirs: dict, reference: dict, factor: float = 2.0, slack: float = 1e-2):
    """Each of `ours` (name -> gradient, say of a bf16 step) is no further from `reference` (the
    float32 step's) than `theirs` (PyTorch's bf16 step's), within `factor` and `slack` for the noise.
    For paths that round differently: after a batch norm's backward, a small difference of large sums,
    the two bf16 roundings can each be several percent off. Errors are relative to the reference's
    norm, or 1% of the largest gradient's where that is smaller (a conv bias before a batch norm has
    no gradient in exact arithmetic)."""
    scale = max(grad.norm().item() for grad in reference.values())

    def off(grad, name):
        return ((grad.float() - reference[name]).norm() / max(reference[name].norm().item(), 1e-2 * scale)).item()
    for name, grad in ours.items():
        assert off(grad, name) <= factor * off(theirs[name], name) + slack, (name, off(grad, name), off(theirs[name], name))


# Tiny trainings through the API and the CLI (the bundled sample, a 1x8 network, a few hundred images)

SAMPLE = "fashion-mnist-sample"
TINY = dict(arch="1x8", fc_width=16, init="xavier", input_size=28, limit=200, test_limit=100, val_size=100,
            batch_size=50, epochs=1, lr=0.05, precision="fp32", threads=1, data=SAMPLE)
TINY_FLAGS = ["--arch", "1x8", "--fc-width", "16", "--init-scheme", "xavier", "--input-size", "28", "--limit", "200",
              "--test-limit", "100", "--val-size", "100", "--batch-size", "50", "--epochs", "1", "--lr", "0.05",
              "--precision", "fp32", "--threads", "1", "--data", SAMPLE]
STEPS_PER_EPOCH = 4  # 200 training images (validation comes on top), batches of 50
QUIET = dict(progress="none", log=lambda *a, **k: None)


def tiny(out, name="run", **changes) -> dict:
    return {**TINY, "out": str(out), "name": name, **changes}


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("vggkit: error: ") and "Traceback" not in err, err
    return err


def snapshot(root: Path, leave_out: Path | None = None) -> dict:
    """Every file and folder under root (but leave_out) with its mode and contents."""
    files = {}
    for path in sorted(root.rglob("*")):
        if leave_out is not None and (path == leave_out or leave_out in path.parents):
            continue
        files[path] = (path.stat().st_mode, path.read_bytes() if path.is_file() else None)
    return files


def checkpoints_in(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("model.safetensors"))


def assert_checkpoints_sound(root: Path) -> list[Path]:
    """Every checkpoint under root loads, has finite weights and gives finite outputs."""
    found = checkpoints_in(root)
    for directory in found:
        model, meta = load_model(directory)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
        assert torch.isfinite(model(torch.rand(2, 1, 28, 28))).all()
    return found


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def vggkit_command(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vggkit", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


def copy_every_linear(monkeypatch) -> None:
    """Weight copies for dense layers of any size (tests use small ones; tuning.MIN_COPY_WEIGHTS would skip them)."""
    import dataclasses

    from vggkit.kernels import tuning

    monkeypatch.setattr(tuning, "MIN_COPY_WEIGHTS", dataclasses.replace(tuning.MIN_COPY_WEIGHTS, value=0))


def random_rgb_weights(path: Path, classes: list[str], input_size: int, batch_norm: bool = False) -> Path:
    """A seeded 2-block RGB network, far from its initialisation, saved with its preprocessing at input_size."""
    from vggkit.checkpoint import save_checkpoint
    from vggkit.model import VGG
    from vggkit.preprocess import preprocess_meta

    torch.manual_seed(1)
    model = VGG("1x8,1x8", in_channels=3, num_classes=len(classes), input_size=input_size, fc_width=16,
                batch_norm=batch_norm)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    meta = {"classes": classes, "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": input_size, "dataset": "drawn",
            "is_sample": False, **preprocess_meta((input_size, input_size))}
    save_checkpoint(path, model, meta)
    return path
