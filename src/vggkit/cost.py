"""The cost report: per block (or layer) output shape, parameters, MACs and activation memory,
plus an estimate of the memory one training step needs.

Training memory = weights + gradients + optimizer state + activations kept for backward + input.
What autograd keeps, per layer (PyTorch's saved tensors, with in-place ReLU as in vggkit):
  conv/linear/batch-norm output: one tensor (the next layer saves it as its input);
  ReLU: nothing extra (it saves its output; in place, that is the tensor it shares; out of place,
  the input is then freed, as nothing else saves it: the same bytes, measured); max-pool: output
  + int64 indices;
  dropout: output + a 1-byte mask; flatten: a view, nothing.
Under autocast (dtype bfloat16/float16) two more things live through the step (measured,
BENCHMARKS.md "Memory estimate vs measured"): the low-precision copies of the conv/linear
weights (cast once per forward, kept for backward), and the float32 input batch next to its
low-precision copy that the first convolution saves. Not counted: the runtime's one-time
memory (oneDNN/OpenMP, ~50-80 MB on CPU), transient gradient buffers in backward, and memory
an allocator keeps cached.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .units import binary_size, si
from .optim import OPTIMIZER_STATES

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The precisions every command names (train, bench, summary): name -> the torch dtype's name.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISION_OF = {dtype: name for name, dtype in PRECISION_DTYPES.items()}  # float32 -> fp32, as the flags say it
# how the report names the optimizer state it counts: `vggkit train --optimizer sgd` keeps a momentum buffer
OPTIMIZER_SHOWN = {"momentum": "sgd with momentum", "sgd": "sgd without momentum"}


@dataclass
class Row:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int = 0
    macs: int = 0  # per sample
    activation_bytes: int = 0  # per sample, what backward keeps
    output_bytes: int = 0  # per sample, size of the output tensor


@dataclass
class Report:
    input_shape: tuple[int, ...]
    batch_size: int
    optimizer: str
    dtype: str
    layers: list[Row]
    blocks: list[Row] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers)

    def memory(self) -> dict[str, int]:
        """Bytes one training step needs at this batch size (float32 weights, AMP-style activations)."""
        weights = 4 * self.params
        act_bytes = DTYPE_BYTES[self.dtype]
        autocast = act_bytes != 4
        # the float32 input batch, plus (autocast) its low-precision copy saved by the first conv
        input_bytes = (4 + act_bytes if autocast else 4) * _numel(self.input_shape)
        activations = self.batch_size * (input_bytes + sum(r.activation_bytes for r in self.layers))
        # autocast's low-precision copies of the conv/linear weights, saved for backward
        cast_weights = act_bytes * sum(r.params for r in self.layers if r.kind in ("Conv2d", "Linear")) if autocast else 0
        return {
            "weights": weights,
            "gradients": weights,
            "optimizer_state": OPTIMIZER_STATES[self.optimizer] * weights,
            "activations": activations,
            "autocast_weights": cast_weights,
            "total": (2 + OPTIMIZER_STATES[self.optimizer]) * weights + activations + cast_weights,
        }

    def to_dict(self, per_layer: bool = False) -> dict:
        rows = self.layers if per_layer else self.blocks
        return {
            "input_shape": list(self.input_shape),
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "activation_dtype": self.dtype,
            "rows": [dict(asdict(r), output_shape=list(r.output_shape)) for r in rows],
            "totals": {"params": self.params, "macs": self.macs, "flops": 2 * self.macs},
            "training_memory_bytes": self.memory(),
        }

    def table(self, per_layer: bool = False) -> str:
        rows = self.layers if per_layer else self.blocks
        header = f"{'layer' if per_layer else 'block':<16}{'output':>16}{'params':>14}{'MACs':>12}{'activations':>14}"
        lines = [f"input {'x'.join(map(str, self.input_shape))}, batch {self.batch_size}", header, "-" * len(header)]
        for r in rows:
            shape = "x".join(map(str, r.output_shape))
            lines.append(f"{r.name:<16}{shape:>16}{r.params:>14,}{si(r.macs, digits=2, space=False):>12}"
                         f"{_bytes(self.batch_size * r.activation_bytes):>14}")
        lines.append("-" * len(header))
        lines.append(f"{'total':<16}{'':>16}{self.params:>14,}{si(self.macs, digits=2, space=False):>12}")
        mem = self.memory()
        lines.append(
            f"training step, batch {self.batch_size} ({OPTIMIZER_SHOWN.get(self.optimizer, self.optimizer)}, "
            f"{PRECISION_OF[self.dtype]} activations): "
            f"~{_bytes(mem['total'])} = weights {_bytes(mem['weights'])} + gradients {_bytes(mem['gradients'])}"
            f" + optimizer {_bytes(mem['optimizer_state'])} + activations {_bytes(mem['activations'])}"
            + (f" + {PRECISION_OF[self.dtype]} weight copies {_bytes(mem['autocast_weights'])}"
               if mem["autocast_weights"] else "")
        )
        lines.append("  (what the step's tensors need; on CPU `vggkit train` keeps freed memory for speed: its peak RSS "
                     "measured 1.25-1.75x this, BENCHMARKS.md; --allocator default stays closer)")
        return "\n".join(lines)


def summary(model: nn.Module, input_size=None, batch_size: int = 1, optimizer: str = "momentum",
            dtype: str = "float32") -> Report:
    """Cost report of `model` for one input of `input_size` ((C, H, W), (H, W) or an int); `dtype` is the
    activations' (float32, bfloat16, float16, or a precision name: fp32, bf16, fp16).

    Runs one forward pass with hooks on a batch of one (on the meta device if the model lives there).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}")
    dtype = PRECISION_DTYPES.get(dtype, dtype)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join([*PRECISION_DTYPES, *DTYPE_BYTES])}")
    shape = _input_shape(model, input_size)
    device = next(model.parameters()).device
    act_bytes = DTYPE_BYTES[dtype]
    rows: list[Row] = []

    def hook(module, inputs, output):
        name = names[module]
        out = tuple(output.shape[1:])
        rows.append(Row(name, type(module).__name__, out, sum(p.numel() for p in module.parameters(recurse=False)),
                        _macs(module, inputs[0], output), _saved_bytes(module, out, act_bytes),
                        act_bytes * _numel(out)))

    names = {m: n for n, m in model.named_modules() if not list(m.children())}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device))
    finally:
        for h in handles:
            h.remove()
    return Report(shape, batch_size, optimizer, dtype, rows, _group_blocks(rows))


def _input_shape(model, input_size) -> tuple[int, int, int]:
    channels = getattr(model, "in_channels", 3)
    if input_size is None:
        input_size = getattr(model, "input_size", 224)
    if isinstance(input_size, int):
        return (channels, input_size, input_size)
    if len(input_size) == 2:
        return (channels, *input_size)
    return tuple(input_size)


def _macs(module, inp, out) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return _numel(out.shape[1:]) * k
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def _saved_bytes(module, out_shape, act_bytes) -> int:
    n = _numel(out_shape)
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        return n * act_bytes
    if isinstance(module, nn.MaxPool2d):
        return n * (act_bytes + 8)
    if isinstance(module, nn.Dropout):
        return n * (act_bytes + 1) if module.p > 0 else 0
    return 0


def _group_blocks(rows: list[Row]) -> list[Row]:
    """features.<i>.* rows become 'block i+1'; everything under classifier stays one row per dense layer."""
    blocks: list[Row] = []
    for r in rows:
        parts = r.name.split(".")
        if parts[0] == "features" and len(parts) >= 3:
            name = f"block{int(parts[1]) + 1}"
        elif isinstance(r, Row) and r.kind == "Linear":
            name = f"dense{sum(b.name.startswith('dense') for b in blocks) + 1}"
        elif r.kind == "Flatten":
            name = "flatten"
        else:
            # ReLU/Dropout after a dense layer: fold into it
            if blocks:
                last = blocks[-1]
                last.activation_bytes += r.activation_bytes
            continue
        if blocks and blocks[-1].name == name:
            last = blocks[-1]
            last.output_shape, last.params = r.output_shape, last.params + r.params
            last.macs += r.macs
            last.activation_bytes += r.activation_bytes
            last.output_bytes = r.output_bytes
        else:
            blocks.append(Row(name, "block" if name.startswith("block") else r.kind, r.output_shape, r.params,
                              r.macs, r.activation_bytes, r.output_bytes))
    return blocks


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_bytes = binary_size
