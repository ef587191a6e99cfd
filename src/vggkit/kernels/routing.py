"""Which kernel computes each part of a VGG block (and the classifier's dropout and dense layers).

One table (OPS) of the fused ops, each with the layers it covers (`covers`) and why it does not apply
to them for an input (`why_not`: human-readable reasons, empty where it applies), in one priority list
(PRIORITY: the first op that covers a layer and applies computes it; PyTorch's own module otherwise).
The checks every op shares (device, dtype, torch.compile, tracing, the library) are written once
(`_common`, Context). `route_block` walks a block once, deciding on the real tensors as it computes
(VGGBlock.forward); `plan_block` walks it on shapes alone (Spec), for `explain`. The wrappers the
steps call (pool_relu.compute, bn_relu.compute, ...) trust the step and check nothing.

Mode vocabulary (MODES), set on the blocks by model.set_kernels and by the `kernels` setting:
  fast       the ops of this table where they apply, the pool before the last ReLU elsewhere
  reordered  the pool before the last ReLU (they commute), PyTorch's ops: where the kernels cannot run
  plain      every layer in order, exactly nn.Sequential
"fused" (the blocks' old name for fast) and "auto" (the setting's) are read as "fast".
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import bn_relu, build, conv_pool, conv_weight_grad, folded, pool_relu, tuning
from .conv_relu import compute as conv_relu_compute  # the package's `conv_relu` is this module's function below
from .tuning import FASTER_IN_CHANNELS, MIN_IN_CHANNELS

MODES = ("fast", "reordered", "plain")
OLD_NAMES = {"fused": "fast", "auto": "fast"}  # what older code and configs wrote


def mode_named(name: str) -> str:
    """The mode `name` means (MODES; the old spellings in OLD_NAMES accepted); ValueError for another."""
    mode = OLD_NAMES.get(name, name)
    if mode not in MODES:
        raise ValueError(f"unknown kernels mode {name!r}; choose one of {', '.join(MODES)}")
    return mode


def mode_for(setting: str, device: torch.device) -> str:
    """The blocks' mode for a `kernels` setting on `device`: fast becomes reordered off the CPU, the only
    device the kernels exist for."""
    mode = mode_named(setting)
    return "reordered" if mode == "fast" and device.type != "cpu" else mode


# ---- what routing reads of a tensor and of the moment


@dataclass(frozen=True)
class Spec:
    """What the routing reads of a tensor: shape, dtype, device, whether autograd tracks it."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False

    @classmethod
    def of(cls, x: torch.Tensor | Spec) -> Spec:
        return x if isinstance(x, Spec) else cls(tuple(x.shape), x.dtype, x.device, x.requires_grad)


class Context:
    """The state every op's decision reads, taken once per block: grad mode, CPU autocast,
    torch.compile, tracing; and the library, asked only when an op gets that far (it builds it)."""

    def __init__(self):
        self.grad = torch.is_grad_enabled()
        self.autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.compiling = torch.compiler.is_compiling()
        self.tracing = torch.jit.is_tracing()

    def compute_dtype(self, x: Spec) -> torch.dtype:
        """The dtype a convolution computes in: autocast's where it is on, else x's."""
        return self.autocast if self.autocast is not None and x.dtype.is_floating_point else x.dtype

    @functools.cached_property
    def library(self) -> list[str]:
        if build.LIBRARY.available():
            return []
        return [f"no C++ kernels ({build.LIBRARY.reason})"]


def hooked(*modules: nn.Module) -> bool:
    """Whether any of `modules` has forward (pre-)hooks: such layers run as they are, never fused, so
    that the hooks see the tensors they expect."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _hooks(*modules: nn.Module) -> list[str]:
    return [f"forward hooks on the {type(m).__name__}" for m in modules if hooked(m)]


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


FLOATS = (torch.float32, torch.bfloat16)


def _common(x: Spec, ctx: Context, dtypes=FLOATS, *, dtype=None, library=True) -> list[str]:
    """The checks every op makes: a 4-D CPU input of a dtype it takes, outside torch.compile, the
    library loaded (not for oneDNN's ops)."""
    why = _on_cpu(x.device)
    if len(x.shape) != 4:
        why.append(f"a {len(x.shape)}-D input (the kernels take 4-D)")
    dtype = x.dtype if dtype is None else dtype
    if dtype not in dtypes:
        why.append(f"{_names([dtype])} (the kernels take {_names(dtypes)})")
    if ctx.compiling:
        why.append("under torch.compile")
    return why + (ctx.library if library and not why else [])


def _on_cpu(*devices: torch.device) -> list[str]:
    """The one device the kernels exist for."""
    return [f"not on the CPU ({d.type})" for d in dict.fromkeys(devices) if d.type != "cpu"][:1]


def _tracked(x: Spec, ctx: Context) -> list[str]:
    if not ctx.grad:
        return ["inference: no gradient to record (PyTorch's op is as fast)"]
    return [] if x.requires_grad else ["the input needs no gradient"]


# ---- each op: why it does not apply (empty: it does)


def _why_not_max_pool_relu(layers, x, ctx, tuned=True):
    return _common(x, ctx, (torch.float32, torch.bfloat16, torch.float64))


def _batch_norm_module(bn: nn.Module, x: Spec, ctx: Context) -> list[str]:
    """The module's part: an nn.BatchNorm2d (no subclass) in training mode without hooks, its
    parameters and statistics float32 and contiguous on x's device, outside tracing."""
    if type(bn) is not nn.BatchNorm2d:
        return [f"a {type(bn).__name__}, not nn.BatchNorm2d"]
    why = [] if bn.training else ["eval mode: the running statistics (PyTorch's batch norm)"]
    why += _hooks(bn) + (["traced (export): the layers as they are"] if ctx.tracing else [])
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if not all(t is None or (t.dtype == torch.float32 and t.device == x.device and t.is_contiguous()) for t in tensors):
        why.append(f"its parameters or statistics are not contiguous float32 on {x.device.type}")
    return why


def _why_not_batch_norm_relu(layers, x, ctx, tuned=True):
    why = _batch_norm_module(layers[0], x, ctx)
    if len(x.shape) == 4 and not (x.shape[0] * x.shape[2] * x.shape[3] > 1 and x.shape[1] > 0):
        why.append("one value per channel")
    return why + _common(x, ctx, FLOATS) + (_tracked(x, ctx) if not why else [])


def _why_not_batch_norm_pool_relu(layers, x, ctx, tuned=True):
    why = _why_not_batch_norm_relu(layers, x, ctx)
    if len(x.shape) == 4 and min(x.shape[-2:]) < 2:
        why.append("under 2x2 pixels: an empty pooled output")
    return why


def _convolution(conv: nn.Module, x: Spec, ctx: Context) -> list[str]:
    """What oneDNN's fused convolution takes: a zero-padded nn.Conv2d on a 4-D float32/bfloat16 CPU input."""
    if not isinstance(conv, nn.Conv2d):
        return [f"a {type(conv).__name__}, not a convolution"]
    why = [] if conv.padding_mode == "zeros" and not isinstance(conv.padding, str) else ["padding other than zeros by number"]
    why += _common(x, ctx, FLOATS, dtype=ctx.compute_dtype(x), library=False)
    return why + ([] if torch.backends.mkldnn.is_available() else ["no oneDNN in this PyTorch"])


def _why_not_conv_relu(layers, x, ctx, tuned=True):
    return _convolution(layers[0], x, ctx) + _hooks(*layers)


def _weight_grad_on_tiles(conv: nn.Conv2d, x: Spec, ctx: Context, tuned=True) -> list[str]:
    """Why the weight gradient of conv(x) does not run on the AMX tiles (conv_weight_grad.py): bf16, 3x3,
    stride 1, padding 1, no dilation or groups, channels multiples of 16, at least MIN_IN_CHANNELS in."""
    why = []
    if ctx.compute_dtype(x) != torch.bfloat16:
        why.append(f"computes in {_names([ctx.compute_dtype(x)])} (the tiles take bfloat16)")
    if (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups) != \
            ((3, 3), (1, 1), (1, 1), (1, 1), 1) or len(x.shape) != 4:
        why.append("not a 3x3, stride-1, padding-1 convolution")
    elif x.shape[1] % 16 or conv.out_channels % 16:
        why.append("channels not multiples of 16")
    elif tuned and x.shape[1] < MIN_IN_CHANNELS.value:
        why.append(f"{x.shape[1]} input channels: under {MIN_IN_CHANNELS.value} measured slower than oneDNN's"
                   + _where_measured(MIN_IN_CHANNELS))
    if why:
        return why
    return ctx.library or ([] if conv_weight_grad._amx() else ["no AMX on this CPU (or Linux does not let this process use it)"])


def _why_not_conv_tiled_weight_grad(layers, x, ctx, tuned=True):
    conv = layers[0]
    why = _convolution(conv, x, ctx) + _hooks(conv)
    if why:
        return why
    if not (conv.weight.requires_grad and ctx.grad):
        return ["no weight gradient to compute"]
    return _weight_grad_on_tiles(conv, x, ctx, tuned)


def _first_layer(conv: nn.Module, x: Spec, ctx: Context, tuned: bool) -> list[str]:
    """What the conv + pool kernel takes: an nn.Conv2d (no subclass) without hooks, 3x3, stride 1, zero
    padding 1, no dilation or groups, 1 to MAX_IN_CHANNELS input channels, whose input needs no gradient
    (a network's first layer); a 4-D float32 or bfloat16 CPU input of at least 2x2 (under CPU autocast,
    bfloat16; else the weight's dtype); outside torch.compile and tracing, with the library built."""
    MAX_IN_CHANNELS = conv_pool.MAX_IN_CHANNELS
    if type(conv) is not nn.Conv2d:
        return [f"a {type(conv).__name__}, not nn.Conv2d"]
    why = _hooks(conv)
    geometry = (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups,
                conv.padding_mode)
    if geometry != ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"):
        why.append("not a 3x3, stride-1, zero-padding-1 convolution")
    if not 1 <= conv.in_channels <= MAX_IN_CHANNELS:
        why.append(f"{conv.in_channels} input channels (the kernel takes 1 to {MAX_IN_CHANNELS})")
    weight, bias = conv.weight, conv.bias
    same = bias is None or bias.dtype == weight.dtype
    if ctx.autocast is None:
        same = same and x.dtype == weight.dtype
    if not same:
        why.append("input, weight and bias of different dtypes")
    why += _on_cpu(weight.device)
    if weight.dtype not in FLOATS:
        why.append("weights not float32 or bfloat16")
    if len(x.shape) == 4 and (x.shape[1] != conv.in_channels or min(x.shape[2:]) < 2):
        why.append("an input of other channels than the conv's, or under 2x2 pixels")
    if x.requires_grad:
        why.append("its input needs a gradient: not a network's first layer")
    if x.dtype not in FLOATS:
        why.append(f"{_names([x.dtype])} input (the kernel takes {_names(FLOATS)})")
    why += ["traced (export): the layers as they are"] if ctx.tracing else []
    why += _common(x, ctx, FLOATS, dtype=ctx.compute_dtype(x), library=not why)
    if tuned and not why and conv.in_channels > FASTER_IN_CHANNELS.value:
        why.append(f"{conv.in_channels} input channels (RGB): oneDNN's convolution then the pool measured faster"
                   + _where_measured(FASTER_IN_CHANNELS))
    return why


def _why_not_conv_pool_relu(layers, x, ctx, tuned=True):
    return _first_layer(layers[0], x, ctx, tuned)


def _why_not_conv_batch_norm_pool_relu(layers, x, ctx, tuned=True):
    conv, bn = layers[0], layers[1]
    why = _first_layer(conv, x, ctx, tuned=False)
    if not why and not (conv.weight.requires_grad and ctx.grad):
        why.append("inference or a frozen conv: no gradient to record")
    why += _batch_norm_module(bn, x, ctx)
    if not why and bn.num_features != conv.out_channels:
        why.append("a batch norm of other channels than the conv's")
    if not why and not x.shape[0] * x.shape[2] * x.shape[3] > 1:
        why.append("one value per channel")
    if tuned and not why and conv.in_channels > FASTER_IN_CHANNELS.value:
        why.append(f"{conv.in_channels} input channels (RGB): the moments cost what the fused batch norm saves"
                   + _where_measured(FASTER_IN_CHANNELS))
    return why


def _why_not_folded_block(layers, x, ctx, tuned=True):
    body = layers
    if ctx.grad:
        return ["autograd records (training): batch statistics"]
    if len(body) % 3 != 2:
        return ["not [conv, batch norm, ReLU] x (n - 1) then conv, batch norm"]
    why = _hooks(*body)
    convs, norms, relus = body[0::3], body[1::3], body[2::3]
    if not all(isinstance(relu, nn.ReLU) for relu in relus):
        why.append("not conv, batch norm, ReLU in turn")
    for bn in norms:
        if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_var is None:
            why.append("a batch norm in training mode or without running statistics")
            break
    if not all(isinstance(conv, nn.Conv2d) and conv.out_channels == getattr(bn, "num_features", None)
               for conv, bn in zip(convs, norms)):
        why.append("not a convolution before each batch norm")
    for conv in convs:
        reasons = _convolution(conv, x, ctx)
        if reasons:
            return why + reasons
    return why


def _why_not_dropout(layers, x, ctx, tuned=True):
    dropout = layers[0]
    why = [] if dropout.training else ["eval mode: no dropout"]
    why += ["in place"] if dropout.inplace else []
    why += ["traced (export)"] if ctx.tracing else []
    why += _on_cpu(x.device)
    why += [] if x.dtype.is_floating_point else ["not a floating-point input"]
    why += [] if 0 < dropout.p < 1 else ["p = 0: nothing to drop" if dropout.p == 0 else f"p = {dropout.p}"]
    return why + (["under torch.compile"] if ctx.compiling else [])


def _why_not_linear_with_copy(layers, x, ctx, tuned=True):
    linear = layers[0]
    weight = linear.weight
    if tuned and weight.numel() < tuning.MIN_COPY_WEIGHTS.value:
        why = [f"{weight.numel():,} weights: under {tuning.MIN_COPY_WEIGHTS.value:,} a bfloat16 copy measured slower "
               "than autocast's cast" + _where_measured(tuning.MIN_COPY_WEIGHTS)]
    elif getattr(linear, "weight_copy", None) is None:
        why = ["no optimizer keeps a bfloat16 copy of its weight (SGD in one process does)"]
    else:
        why = []
    if not (linear.training and ctx.grad and weight.requires_grad):
        why.append("no weight gradient (inference or frozen)")
    if ctx.autocast != torch.bfloat16:
        why.append("not under bfloat16 autocast")
    why += _on_cpu(x.device, weight.device)
    if not (weight.dtype == torch.float32 and weight.is_contiguous()):
        why.append("not a contiguous float32 weight")
    why += ["traced (export)"] if ctx.tracing else []
    return why + (["under torch.compile"] if ctx.compiling else [])


def _where_measured(threshold: tuning.Threshold) -> str:
    note = tuning.measured_here(threshold)
    return f" ({note})" if note else ""


# ---- the table


@dataclass(frozen=True)
class Op:
    """One row of the table: a fused op, what it covers, why it would not apply, how to run it."""
    name: str
    computes: str  # what it computes, one line
    source: str  # the C++ file (or library) it runs on
    covers: Callable[[list, int], int]  # the layers it would compute from position i of a block: a count, 0 if none
    why_not: Callable  # (layers, x: Spec, ctx, tuned) -> reasons; empty where it applies
    run: Callable = None  # (step, x) -> the step's output, by the op's wrapper (which trusts the step)
    output: Callable = None  # (step, x: Spec, ctx) -> the output's Spec, for plan_block
    options: Callable = None  # (covered, x: Spec, ctx) -> the step's (backward, option); default (True, False)


def _body(layers) -> int:
    return len(layers) - 2  # a block's layers before its last ReLU and pool


def _is(kind, layers, i) -> bool:
    return 0 <= i < len(layers) and isinstance(layers[i], kind)


OPS = {op.name: op for op in (
    Op("folded_block", "a block's convs with their eval-mode batch norms folded in, each conv + ReLU one call",
       "oneDNN (conv_pool_relu.cpp for a gray first conv)",
       lambda L, i: _body(L) if i == 0 and _body(L) % 3 == 2 and any(isinstance(m, nn.BatchNorm2d) for m in L[:-2])
       else 0, _why_not_folded_block,
       run=lambda s, x: folded.compute(list(s.layers), x, s.option),
       output=lambda s, x, ctx: _folded_output(s, x, ctx),
       options=lambda covered, x, ctx: (False, _folded_pools(covered, x, ctx))),
    Op("conv_pool_relu", "a first block's conv, 2x2 max-pool and ReLU in one pass", "conv_pool_relu.cpp",
       lambda L, i: 3 if i == 0 and len(L) == 3 else 0, _why_not_conv_pool_relu,
       run=lambda s, x: conv_pool.compute(s.layers[0], x, s.backward),
       output=lambda s, x, ctx: _pooled(_conv_output(s.layers[0], x, ctx, grad=s.backward)),
       options=lambda covered, x, ctx: (covered[0].weight.requires_grad and ctx.grad, False)),
    Op("conv_batch_norm_pool_relu", "a first block's conv, batch norm (moments in closed form), pool and ReLU",
       "conv_pool_relu.cpp", lambda L, i: 4 if i == 0 and len(L) == 4 else 0, _why_not_conv_batch_norm_pool_relu,
       run=lambda s, x: conv_pool.compute_with_batch_norm(s.layers[0], s.layers[1], x),
       output=lambda s, x, ctx: _pooled(_conv_output(s.layers[0], x, ctx, grad=True))),
    Op("batch_norm_pool_relu", "a block's last batch norm, pool and ReLU in one pass", "batch_norm_pool_relu.cpp",
       lambda L, i: 3 if i == _body(L) - 1 and _is(nn.BatchNorm2d, L, i) else 0, _why_not_batch_norm_pool_relu,
       run=lambda s, x: bn_relu.compute_with_pool(x, s.layers[0]),
       output=lambda s, x, ctx: _pooled(x, requires_grad=True)),
    Op("batch_norm_relu", "a training-mode batch norm and the ReLU after it in one pass", "batch_norm_relu.cpp",
       lambda L, i: (2 if i + 1 < _body(L) and _is(nn.ReLU, L, i + 1) and not hooked(L[i + 1]) else 1)
       if i < _body(L) and _is(nn.BatchNorm2d, L, i) else 0, _why_not_batch_norm_relu,
       run=lambda s, x: bn_relu.compute(x, s.layers[0], s.option),
       output=lambda s, x, ctx: replace(x, requires_grad=True),
       options=lambda covered, x, ctx: (True, len(covered) == 2)),
    Op("conv_relu", "a conv and its ReLU as one oneDNN call (weight gradient on the AMX tiles where it applies)",
       "oneDNN", lambda L, i: 2 if i + 1 < _body(L) and _is(nn.Conv2d, L, i) and _is(nn.ReLU, L, i + 1) else 0,
       _why_not_conv_relu,
       run=lambda s, x: conv_relu_compute(s.layers[0], x, relu=True, tiles=s.option),
       output=lambda s, x, ctx: _conv_output(s.layers[0], x, ctx),
       options=lambda covered, x, ctx: (False, _tiles(covered[0], x, ctx))),
    Op("conv_tiled_weight_grad", "a conv before a batch norm, its weight gradient on the AMX tiles",
       "conv_weight_grad.cpp", lambda L, i: 1 if i < _body(L) and _is(nn.Conv2d, L, i) else 0,
       _why_not_conv_tiled_weight_grad,
       run=lambda s, x: conv_relu_compute(s.layers[0], x, relu=False, tiles=True),
       output=lambda s, x, ctx: _conv_output(s.layers[0], x, ctx)),
    Op("max_pool_relu", "the 2x2 max-pool and the block's last ReLU in one pass", "max_pool_relu.cpp",
       lambda L, i: 2 if i == _body(L) else 0, _why_not_max_pool_relu,
       run=lambda s, x: pool_relu.compute(x, s.backward),
       output=lambda s, x, ctx: _pooled(x, requires_grad=s.backward),
       options=lambda covered, x, ctx: (x.requires_grad and ctx.grad, False)),
    # the classifier's: model.Dropout and model.Linear ask `uses` (they cover no block layers)
    Op("dropout", "dropout with its mask from 64-bit random words", "PyTorch (torch.Tensor.random_)",
       lambda L, i: 0, _why_not_dropout),
    Op("linear_with_copy", "a dense layer on the bfloat16 copy of its weight the optimizer keeps",
       "sgd_bf16_copy.cpp", lambda L, i: 0, _why_not_linear_with_copy),
)}
# Preference, first to last: the first op that covers a block's layers and applies computes them.
PRIORITY = ("folded_block", "conv_pool_relu", "conv_batch_norm_pool_relu", "batch_norm_pool_relu", "batch_norm_relu",
            "conv_relu", "conv_tiled_weight_grad", "max_pool_relu")
PYTORCH = "pytorch"  # a step of PyTorch's own module(s)


def why_not(op: str, layers: Sequence[nn.Module], x: torch.Tensor | Spec, *, tuned: bool = True) -> list[str]:
    """Why `op` (a name in OPS) does not apply to `layers` on x, now (grad mode, autocast): empty where it
    does. tuned=False leaves out the reasons that are measurements (slower here), keeping what the
    kernel cannot take."""
    return OPS[op].why_not(list(layers), Spec.of(x), Context(), tuned)


# ---- a block's steps


@dataclass
class Step:
    op: str  # a name in OPS, or PYTORCH
    layers: tuple  # the block's layers it computes
    backward: bool = False  # the op's autograd function (records the gradient) rather than its forward alone
    option: bool = False  # batch_norm_relu: with the ReLU; conv_relu: weight gradient on the tiles;
    #                       folded_block: the last conv pooled by conv_pool_relu
    declined: list = field(default_factory=list)  # (op, reasons) tried before this one, in PRIORITY order


def _pool_first_reasons(layers: list, mode: str, ctx: Context) -> list[str]:
    """Why a block runs its layers in order instead of the pool before the last ReLU."""
    if mode == "plain":
        return ["kernels mode plain"]
    if ctx.tracing:
        return ["traced (export): the layers in order"]
    if len(layers) < 2 or not (isinstance(layers[-2], nn.ReLU) and isinstance(layers[-1], nn.MaxPool2d)):
        return ["not ending in ReLU then max-pool"]
    if hooked(layers[-2], layers[-1]):
        return ["forward hooks on its last ReLU or pool"]
    from torch.nn.modules import module

    return ["global forward hooks"] if module._global_forward_hooks or module._global_forward_pre_hooks else []


def _choose(layers: list, i: int, x: Spec, ctx: Context) -> Step:
    """The step computing layers[i:] first: the first op in PRIORITY that covers them and applies."""
    declined = []
    for name in PRIORITY:
        op = OPS[name]
        count = op.covers(layers, i)
        if not count:
            continue
        covered = layers[i:i + count]
        reasons = op.why_not(covered, x, ctx, True)
        if reasons:
            declined.append((name, reasons))
            continue
        backward, option = op.options(covered, x, ctx) if op.options else (True, False)
        return Step(name, tuple(covered), backward, option, declined=declined)
    count = 2 if i == _body(layers) else 1  # the pool and the last ReLU, or one layer
    return Step(PYTORCH, tuple(layers[i:i + count]), declined=declined)


def _tiles(conv: nn.Conv2d, x: Spec, ctx: Context) -> bool:
    """Whether conv's weight gradient runs on the AMX tiles (conv_relu's backward)."""
    return conv.weight.requires_grad and ctx.grad and not _weight_grad_on_tiles(conv, x, ctx)


def _folded_pools(body: list, x: Spec, ctx: Context) -> bool:
    """Whether a folded block's last conv runs with the pool as conv_pool_relu (a gray first block)."""
    spec = x
    for conv in body[0::3][:-1]:
        spec = _conv_output(conv, spec, ctx, grad=False)
    dtype = ctx.compute_dtype(spec)
    spec = replace(spec, dtype=dtype, requires_grad=spec.requires_grad and dtype == spec.dtype)  # as x.to(dtype)
    return not _first_layer(body[-2], spec, ctx, tuned=True)


def _walk(block: nn.Module, x, ctx: Context, take: Callable[[Step, object], object], spec_of) -> object:
    """Step through `block` from x: at each position the chosen step, applied by `take` (compute it, or
    carry its output's Spec); returns the last value."""
    layers = list(block)
    mode = mode_named(getattr(block, "kernels", "fast"))
    in_order = _pool_first_reasons(layers, mode, ctx)
    if in_order:
        return take(Step("in_order", tuple(layers), declined=[("pool_first", in_order)]), x)
    if mode == "reordered" or ctx.compiling:
        for layer in layers[:-2]:
            x = take(Step(PYTORCH, (layer,)), x)
        return take(Step(PYTORCH, tuple(layers[-2:])), x)
    i = 0
    while i < len(layers):
        step = _choose(layers, i, spec_of(x), ctx)
        x = take(step, x)
        i += len(step.layers) + (2 if step.op == "folded_block" and step.option else 0)
    return x


def route_block(block: nn.Module, x: torch.Tensor, steps: list | None = None) -> torch.Tensor:
    """block(x) computed by the steps the routing chooses, decided on the real tensors as they come
    (VGGBlock.forward). `steps`, if given, receives them."""
    def take(step, x):
        if steps is not None:
            steps.append(step)
        return RUN[step.op](step, x)

    return _walk(block, x, Context(), take, Spec.of)


def trace_block(block: nn.Module, x: torch.Tensor) -> tuple[list[tuple[Step, torch.Tensor]], torch.Tensor]:
    """route_block, keeping each step with the tensor it took (benchmarks/bench_kernels.py --routes times
    each step against PyTorch's layers on that input)."""
    trace = []

    def take(step, x):
        trace.append((step, x))
        return RUN[step.op](step, x)

    return trace, _walk(block, x, Context(), take, Spec.of)


def plain_layers(step: Step, block: nn.Module) -> tuple:
    """The block's layers a step computes, for PyTorch to compute them instead (a folded block whose
    last conv pooled covers the block's last ReLU and pool too)."""
    return step.layers + (tuple(block)[-2:] if step.op == "folded_block" and step.option else ())


def plan_block(block: nn.Module, x: torch.Tensor | Spec) -> tuple[list[Step], Spec]:
    """The steps block(x) would take now (grad mode, autocast, the block's train/eval mode), from shapes
    alone: nothing is computed. Returns them and the output's Spec."""
    ctx, steps = Context(), []

    def take(step, spec):
        steps.append(step)
        return _output(step, spec, ctx)

    out = _walk(block, Spec.of(x), ctx, take, lambda spec: spec)
    return steps, out


def uses(op: str, module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a classifier layer (Dropout: "dropout", Linear: "linear_with_copy") runs through `op` now."""
    return mode_named(module.kernels) == "fast" and not OPS[op].why_not([module], Spec.of(x), Context(), True)


# ---- running a step (the wrappers trust it)


def _run_pytorch(step: Step, x: torch.Tensor) -> torch.Tensor:
    if len(step.layers) == 2 and isinstance(step.layers[1], nn.MaxPool2d):  # the last ReLU after the pool
        relu, pool = step.layers
        return relu(pool(x))
    for layer in step.layers:
        x = layer(x)
    return x


def _run_in_order(step: Step, x: torch.Tensor) -> torch.Tensor:
    for layer in step.layers:
        x = layer(x)
    return x


RUN = {PYTORCH: _run_pytorch, "in_order": _run_in_order,
       **{op.name: op.run for op in OPS.values() if op.run is not None}}


# ---- a step's output, from shapes (plan_block)


def _conv_output(conv: nn.Conv2d, x: Spec, ctx: Context, grad: bool | None = None) -> Spec:
    h, w = (
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))
    tracked = ctx.grad and (x.requires_grad or any(p.requires_grad for p in conv.parameters())) if grad is None else grad
    return Spec((x.shape[0], conv.out_channels, h, w), ctx.compute_dtype(x), x.device, tracked)


def _module_output(module: nn.Module, x: Spec, ctx: Context) -> Spec:
    if isinstance(module, nn.Conv2d):
        return _conv_output(module, x, ctx)
    tracked = ctx.grad and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    if isinstance(module, (nn.BatchNorm2d, nn.ReLU)):
        return replace(x, requires_grad=tracked)
    if isinstance(module, nn.MaxPool2d):
        out = F.max_pool2d(torch.empty(x.shape, device="meta"), module.kernel_size, module.stride, module.padding,
                           module.dilation, module.ceil_mode)
        return replace(x, shape=tuple(out.shape), requires_grad=tracked)
    out = module(torch.empty(x.shape, dtype=x.dtype, device="meta"))
    return Spec(tuple(out.shape), out.dtype, x.device, tracked)


def _pooled(x: Spec, **changes) -> Spec:
    return replace(x, shape=(*x.shape[:-2], x.shape[-2] // 2, x.shape[-1] // 2), **changes)


def _folded_output(step: Step, x: Spec, ctx: Context) -> Spec:
    for conv in step.layers[0::3]:
        x = _conv_output(conv, x, ctx, grad=False)
    return _pooled(x) if step.option else x


def _output(step: Step, x: Spec, ctx: Context) -> Spec:
    if step.op in (PYTORCH, "in_order"):
        for layer in step.layers:
            x = _module_output(layer, x, ctx)
        return x
    return OPS[step.op].output(step, x, ctx)


# ---- the ops one at a time, each routed on its own (the network routes whole blocks: route_block)


def max_pool_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(x, 2, 2)): the kernel where it applies (with autograd where x records a
    gradient), else PyTorch's ops."""
    if why_not("max_pool_relu", (), x):
        return torch.relu(F.max_pool2d(x, 2, 2))
    return pool_relu.compute(x, x.requires_grad and torch.is_grad_enabled())


def batch_norm_relu(x: torch.Tensor, bn: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    """relu(bn(x)) (bn(x) without `relu`): the fused kernels where they apply, else PyTorch's module."""
    if why_not("batch_norm_relu", [bn], x):
        y = bn(x)
        return torch.relu(y) if relu else y
    return bn_relu.compute(x, bn, relu)


def batch_norm_pool_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(max_pool2d(bn(x), 2, 2)): one kernel where it applies, else batch_norm_relu (without ReLU)
    then max_pool_relu, each fused where it can be."""
    if why_not("batch_norm_pool_relu", [bn], x):
        return max_pool_relu(batch_norm_relu(x, bn, relu=False))
    return bn_relu.compute_with_pool(x, bn)


def conv_pool_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2, 2)): the kernels wherever they can take it (RGB too: tuned=False),
    with autograd where the weight needs a gradient, else PyTorch's ops."""
    if why_not("conv_pool_relu", [conv], x, tuned=False):
        return torch.relu(F.max_pool2d(conv(x), 2, 2))
    return conv_pool.compute(conv, x, conv.weight.requires_grad and torch.is_grad_enabled())


def conv_batch_norm_pool_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(bn(conv(x)), 2, 2)): the kernels wherever they can take it, else PyTorch's modules."""
    if why_not("conv_batch_norm_pool_relu", [conv, bn], x, tuned=False):
        return torch.relu(F.max_pool2d(bn(conv(x)), 2, 2))
    return conv_pool.compute_with_batch_norm(conv, bn, x)


def conv_relu(conv: nn.Conv2d, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """relu(conv(x)) (conv(x), relu=False) in one oneDNN call (the caller checked why_not("conv_relu",
    ...)); the weight gradient on the AMX tiles where that applies."""
    return conv_relu_compute(conv, x, relu, _tiles(conv, Spec.of(x), Context()))


def folded_block(body: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(body(x), 2, 2)), body a block's layers before its last ReLU and pool, with the
    batch norms folded into the convs (the caller checked why_not("folded_block", body, x))."""
    pooled = _folded_pools(list(body), Spec.of(x), Context())
    y = folded.compute(list(body), x, pooled)
    return y if pooled else max_pool_relu(y)


# ---- a whole network's routes, from shapes (vggkit summary --explain)


def network_routes(model: nn.Module, x: Spec, *, training: bool,
                   autocast: torch.dtype | None = None) -> list[tuple[str, list[Step]]]:
    """("block i" or "classifier", its steps) for model(x) in training (train mode, autograd) or
    inference (eval mode, no grad), under CPU autocast to `autocast` if given; from shapes alone."""
    was = model.training
    model.train(training)
    try:
        with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=autocast or torch.bfloat16,
                                                              enabled=autocast is not None):
            rows = []
            for i, block in enumerate(model.features, start=1):
                steps, x = plan_block(block, x)
                rows.append((f"block {i}", steps))
            rows.append(("classifier", _classifier_steps(model.classifier, x, Context())))
            return rows
    finally:
        model.train(was)


def _classifier_steps(classifier: nn.Module, x: Spec, ctx: Context) -> list[Step]:
    steps = []
    for module in classifier:
        op = "dropout" if isinstance(module, nn.Dropout) else "linear_with_copy" if isinstance(module, nn.Linear) else None
        if op is None or not isinstance(getattr(module, "kernels", None), str):
            continue
        mode = mode_named(module.kernels)
        reasons = [f"kernels mode {mode}"] if mode != "fast" else OPS[op].why_not([module], x, ctx, True)
        steps.append(Step(PYTORCH, (module,), declined=[(op, reasons)]) if reasons else Step(op, (module,)))
    return steps
