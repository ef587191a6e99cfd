"""vggkit's CPU kernels, op by op, against PyTorch's ops on the shapes of the d2l and fast presets
(bf16, channels-last, the retained allocator as in training): the figures behind each choice of
`--kernels fast`. Median of --repeats calls after two warm-up calls; run it alone.

    .venv/bin/python benchmarks/bench_kernels.py [--repeats 7] [--json out.json]

With --routes, instead: each step the routing (kernels/routing.py) chooses on this machine for the
presets' networks (training: forward + backward under the preset's precision; inference: forward,
no grad), timed on the input it gets there against PyTorch's own layers for the same part of the
block (the plain path), with a verdict per step. The check of the routing's tuning on a CPU
(kernels/tuning.py says where each threshold was measured):

    .venv/bin/python benchmarks/bench_kernels.py --routes [--presets fast d2l best] [--batch N] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from vggkit import allocator, kernels

CL = torch.channels_last
BF16 = torch.bfloat16


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pool_relu(repeats: int) -> list[dict]:
    rows = []
    for n, c, h in [(128, 16, 224), (128, 32, 112), (128, 64, 56), (128, 128, 28), (256, 32, 28), (256, 64, 14)]:
        x = torch.randn(n, c, h, h, dtype=BF16).contiguous(memory_format=CL).requires_grad_()
        y_ref = torch.relu(F.max_pool2d(x, 2, 2))
        g = torch.randn_like(y_ref)
        y = kernels.MaxPoolReLU.apply(x)
        rows.append({"op": "max-pool + ReLU", "shape": [n, c, h, h],
                     "pytorch_fwd_ms": median_ms(lambda: torch.relu(F.max_pool2d(x.detach(), 2, 2)), repeats),
                     "pytorch_bwd_ms": median_ms(lambda: torch.autograd.grad(y_ref, x, g, retain_graph=True), repeats),
                     "vggkit_fwd_ms": median_ms(lambda: kernels.MaxPoolReLU.apply(x), repeats),
                     "vggkit_bwd_ms": median_ms(lambda: torch.autograd.grad(y, x, g, retain_graph=True), repeats)})
    return rows


def conv_relu(repeats: int) -> list[dict]:
    rows = []
    for n, cin, cout, h in [(128, 32, 64, 56), (128, 64, 128, 28), (128, 128, 128, 14)]:
        conv, relu = torch.nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=CL), torch.nn.ReLU()
        x = torch.randn(n, cin, h, h).contiguous(memory_format=CL).requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            y_ref, y = relu(conv(x)), kernels.conv_relu(conv, x)
            g = torch.randn_like(y_ref)
            rows.append({"op": "conv 3x3 + ReLU", "shape": [n, cin, h, h, cout],
                         "pytorch_fwd_ms": median_ms(lambda: relu(conv(x)), repeats),
                         "pytorch_bwd_ms": median_ms(lambda: torch.autograd.grad(y_ref, (x, conv.weight), g, retain_graph=True), repeats),
                         "vggkit_fwd_ms": median_ms(lambda: kernels.conv_relu(conv, x), repeats),
                         "vggkit_bwd_ms": median_ms(lambda: torch.autograd.grad(y, (x, conv.weight), g, retain_graph=True), repeats)})
    return rows


def conv_pool_relu(repeats: int) -> list[dict]:
    """The first block on the input (no input gradient): the d2l preset's gray layer and an RGB one."""
    rows = []
    for n, cin, cout, h in [(128, 1, 16, 224), (64, 3, 32, 64)]:
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=CL)
        x = torch.randn(n, cin, h, h).contiguous(memory_format=CL)
        params = (conv.weight, conv.bias)

        def pytorch():
            return torch.relu(F.max_pool2d(conv(x), 2, 2))

        with torch.autocast("cpu", dtype=BF16):
            y_ref, y = pytorch(), kernels.conv_pool_relu(conv, x)
            assert type(y.grad_fn).__name__ == "ConvPoolReLUBackward"
            g = torch.randn_like(y_ref)
            rows.append({"op": "conv 3x3 + ReLU + max-pool (first layer)", "shape": [n, cin, h, h, cout],
                         "pytorch_fwd_ms": median_ms(pytorch, repeats),
                         "pytorch_bwd_ms": median_ms(lambda: torch.autograd.grad(y_ref, params, g, retain_graph=True),
                                                     repeats),
                         "vggkit_fwd_ms": median_ms(lambda: kernels.conv_pool_relu(conv, x), repeats),
                         "vggkit_bwd_ms": median_ms(lambda: torch.autograd.grad(y, params, g, retain_graph=True),
                                                    repeats)})
    return rows


def conv_batch_norm_pool_relu(repeats: int) -> list[dict]:
    """The first block with batch norm (no input gradient): the fast preset's gray layer and an RGB
    one. Two vggkit variants: oneDNN's convolution then the batch norm + pool + ReLU kernel, and the
    one function with the statistics in closed form (gray inputs only in the network)."""
    rows = []
    for n, cin, cout, h in [(256, 1, 32, 28), (256, 3, 32, 32)]:
        conv, bn = torch.nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=CL), torch.nn.BatchNorm2d(cout)
        x = torch.randn(n, cin, h, h).contiguous(memory_format=CL)
        variants = {"conv, then one kernel": lambda: kernels.batch_norm_pool_relu(conv(x), bn),
                    "one function": lambda: kernels.conv_batch_norm_pool_relu(conv, bn, x)}
        rows += against_pytorch("conv 3x3 + batch norm (training) + max-pool + ReLU (first layer)",
                                [n, cin, h, h, cout], lambda: F.max_pool2d(torch.relu(bn(conv(x))), 2, 2),
                                variants, (conv.weight, conv.bias, bn.weight, bn.bias), repeats)
    return rows


def against_pytorch(op: str, shape: list, pytorch, variants: dict, params: tuple, repeats: int) -> list[dict]:
    """A row per vggkit variant (name -> forward function), each with PyTorch's forward and backward
    times beside it, under bf16 autocast; backward: the gradients of `params` from one output gradient."""
    with torch.autocast("cpu", dtype=BF16):
        y_ref = pytorch()
        g = torch.randn_like(y_ref)
        theirs = {"pytorch_fwd_ms": median_ms(pytorch, repeats),
                  "pytorch_bwd_ms": median_ms(lambda: torch.autograd.grad(y_ref, params, g, retain_graph=True), repeats)}
        rows = []
        for name, fn in variants.items():
            y = fn()
            rows.append({"op": f"{op}, {name}", "shape": shape, **theirs, "vggkit_fwd_ms": median_ms(fn, repeats),
                         "vggkit_bwd_ms": median_ms(lambda: torch.autograd.grad(y, params, g, retain_graph=True), repeats)})
    return rows


def batch_norm_relu(repeats: int) -> list[dict]:
    rows = []
    for n, c, h in [(256, 32, 28), (256, 64, 14), (256, 128, 7)]:
        bn, relu = torch.nn.BatchNorm2d(c), torch.nn.ReLU()
        x = torch.randn(n, c, h, h, dtype=BF16).contiguous(memory_format=CL).requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            y_ref, y = relu(bn(x)), kernels.batch_norm_relu(x, bn, True)
            g = torch.randn_like(y_ref)
            rows.append({"op": "batch norm (training) + ReLU", "shape": [n, c, h, h],
                         "pytorch_fwd_ms": median_ms(lambda: relu(bn(x)), repeats),
                         "pytorch_bwd_ms": median_ms(lambda: torch.autograd.grad(y_ref, (x, bn.weight), g, retain_graph=True), repeats),
                         "vggkit_fwd_ms": median_ms(lambda: kernels.batch_norm_relu(x, bn, True), repeats),
                         "vggkit_bwd_ms": median_ms(lambda: torch.autograd.grad(y, (x, bn.weight), g, retain_graph=True), repeats)})
    return rows


def batch_norm_pool_relu(repeats: int) -> list[dict]:
    """The end of a block with batch norm (the fast preset's shapes): the two kernels it used to run
    (batch norm without ReLU, then max-pool + ReLU) and the one fused kernel, each against PyTorch."""
    rows = []
    for n, c, h in [(256, 32, 28), (256, 64, 14), (256, 128, 7)]:
        bn = torch.nn.BatchNorm2d(c)
        x = torch.randn(n, c, h, h, dtype=BF16).contiguous(memory_format=CL).requires_grad_()
        variants = {"two kernels": lambda: kernels.max_pool_relu(kernels.batch_norm_relu(x, bn, False)),
                    "one kernel": lambda: kernels.batch_norm_pool_relu(x, bn)}
        rows += against_pytorch("batch norm (training) + max-pool + ReLU", [n, c, h, h],
                                lambda: F.max_pool2d(torch.relu(bn(x)), 2, 2), variants, (x, bn.weight), repeats)
    return rows


def dropout(repeats: int) -> list[dict]:
    x = torch.randn(128, 4096, dtype=BF16)
    return [{"op": "dropout 0.5 (training)", "shape": [128, 4096],
             "pytorch_fwd_ms": median_ms(lambda: F.dropout(x, 0.5, True), repeats),
             "vggkit_fwd_ms": median_ms(lambda: kernels.dropout(x, 0.5), repeats)}]


def conv_weight_grad(repeats: int) -> list[dict]:
    """A 3x3 convolution's weight and bias gradients: oneDNN's (through PyTorch) against the AMX kernel
    (kernels/conv_weight_grad.cpp), on the fast (batch 256) and d2l (batch 128) presets' shapes."""
    if not torch.ops.vggkit.conv3x3_weight_grad_available():
        return []
    rows = []
    for n, cin, cout, h in [(256, 32, 64, 14), (256, 64, 64, 14), (256, 64, 128, 7), (256, 128, 128, 7),
                            (128, 16, 32, 112), (128, 32, 64, 56), (128, 64, 64, 56), (128, 64, 128, 28),
                            (128, 128, 128, 28), (128, 128, 128, 14)]:
        x = torch.randn(n, cin, h, h, dtype=BF16).contiguous(memory_format=CL)
        g = torch.randn(n, cout, h, h, dtype=BF16).contiguous(memory_format=CL)
        w = torch.randn(cout, cin, 3, 3, dtype=BF16).contiguous(memory_format=CL)
        onednn = lambda: torch.ops.aten.convolution_backward(g, x, w, [cout], [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                             1, [False, True, True])
        rows.append({"op": "conv 3x3 weight + bias gradient (in the backward)", "shape": [n, cin, h, h, cout],
                     "pytorch_fwd_ms": median_ms(onednn, repeats),
                     "vggkit_fwd_ms": median_ms(lambda: torch.ops.vggkit.conv3x3_weight_grad(g, x), repeats)})
    return rows


def routes(presets: list[str], batch: int | None, repeats: int) -> list[dict]:
    """Per preset, phase, block and routed step: the default route's ms against PyTorch's layers'."""
    from vggkit.kernel_report import preset_network
    from vggkit.kernels import routing
    from vggkit.model import set_kernels
    from vggkit.runtime import speed_settings

    rows = []
    for preset in presets:
        model, config = preset_network(preset)  # on Fashion-MNIST's 1x28x28 where the recipe leaves it
        size = model.input_size[0]
        assert set_kernels(model, config.kernels) == "fast", "the routing is not in the fast mode here"
        speed = speed_settings(config, torch.device("cpu"))
        n = batch or config.batch_size or 128
        for phase in ("training", "inference"):
            training = phase == "training"
            model.train(training)
            x = torch.randn(n, 1, size, size).contiguous(memory_format=CL if speed.channels_last else torch.contiguous_format)
            with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=speed.amp_dtype or BF16,
                                                                  enabled=speed.amp_dtype is not None):
                for i, block in enumerate(model.features, start=1):
                    trace, x = routing.trace_block(block, x)
                    x = x.detach()
                    for step, given in trace:
                        if step.op in (routing.PYTORCH, "in_order"):
                            continue
                        plain = routing.Step(routing.PYTORCH, routing.plain_layers(step, block))
                        given = given.detach().requires_grad_(given.requires_grad)
                        default_ms = median_ms(_timed(routing.RUN[step.op], step, given, training), repeats)
                        plain_ms = median_ms(_timed(routing.RUN[routing.PYTORCH], plain, given, training), repeats)
                        rows.append({"preset": preset, "phase": phase, "block": i, "op": step.op,
                                     "shape": list(given.shape), "default_ms": default_ms, "plain_ms": plain_ms})
                if training:
                    rows += _classifier_routes(preset, model, n, repeats)
    return rows


def _classifier_routes(preset: str, model, n: int, repeats: int) -> list[dict]:
    """The classifier's routed layers (dropout; a dense layer on its weight copy, as SGD gives it)."""
    from vggkit.kernels import WeightCopy, routing, weight_copies

    rows = []
    for module in model.classifier:
        x = torch.randn(n, getattr(module, "in_features", model.fc_width), requires_grad=True)
        if isinstance(module, torch.nn.Linear):
            module.weight_copy = WeightCopy()
            op, default, plain = "linear_with_copy", lambda: weight_copies.linear(module, x), \
                lambda: F.linear(x, module.weight, module.bias)
        elif isinstance(module, torch.nn.Dropout):
            op, default, plain = "dropout", lambda: kernels.dropout(x, module.p), lambda: F.dropout(x, module.p, True)
        else:
            continue
        if not routing.uses(op, module, x):
            continue
        rows.append({"preset": preset, "phase": "training", "block": "classifier", "op": op, "shape": list(x.shape),
                     "default_ms": median_ms(_backward_of(default), repeats),
                     "plain_ms": median_ms(_backward_of(plain), repeats)})
        module.weight_copy = None
    return rows


def _backward_of(fn):
    def call():
        y = fn()
        torch.autograd.backward(y, torch.ones_like(y))
    return call


def _timed(run, step, x, training: bool):
    """A call of run(step, x); in training with its backward from a fixed output gradient."""
    def call():
        y = run(step, x)
        if training and y.requires_grad:
            torch.autograd.backward(y, torch.ones_like(y))
    return call


def print_routes(rows: list[dict], repeats: int) -> None:
    print(f"threads {torch.get_num_threads()}; median ms of {repeats} calls; training: forward + backward")
    print("| preset | phase | block | routed op | input | default ms | plain ms | default / plain | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["default_ms"] / r["plain_ms"]
        verdict = "default at least as fast" if ratio <= 1 else "PLAIN FASTER"
        print(f"| {r['preset']} | {r['phase']} | {r['block']} | {r['op']} | {'x'.join(map(str, r['shape']))} "
              f"| {r['default_ms']:.2f} | {r['plain_ms']:.2f} | {ratio:.2f} | {verdict} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    parser.add_argument("--routes", action="store_true", help="time each routed step against PyTorch's layers")
    parser.add_argument("--presets", nargs="+", default=["fast", "d2l", "best"], help="with --routes")
    parser.add_argument("--batch", type=int, default=None, help="with --routes: batch size (default: the preset's, else 128)")
    args = parser.parse_args()
    allocator.retain_freed_memory()
    assert kernels.available(), "the C++ kernels are not available here"
    if args.routes:
        rows = routes(args.presets, args.batch, args.repeats)
        print_routes(rows, args.repeats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = [*pool_relu(args.repeats), *conv_relu(args.repeats), *conv_pool_relu(args.repeats),
            *conv_batch_norm_pool_relu(args.repeats),
            *batch_norm_relu(args.repeats), *batch_norm_pool_relu(args.repeats), *dropout(args.repeats),
            *conv_weight_grad(args.repeats)]
    print(f"threads {torch.get_num_threads()}, bf16, channels-last; median ms of {args.repeats} calls")
    print("| op | shape | PyTorch fwd / bwd ms | vggkit fwd / bwd ms | speed-up fwd / bwd |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        bwd = "pytorch_bwd_ms" in r
        ours = f"{r['vggkit_fwd_ms']:.1f}" + (f" / {r['vggkit_bwd_ms']:.1f}" if bwd else "")
        theirs = f"{r['pytorch_fwd_ms']:.1f}" + (f" / {r['pytorch_bwd_ms']:.1f}" if bwd else "")
        gain = f"{r['pytorch_fwd_ms'] / r['vggkit_fwd_ms']:.2f}x" + \
            (f" / {r['pytorch_bwd_ms'] / r['vggkit_bwd_ms']:.2f}x" if bwd else "")
        print(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {theirs} | {ours} | {gain} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
