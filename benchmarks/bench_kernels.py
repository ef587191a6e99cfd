"""vggkit's CPU kernels, op by op, against PyTorch's ops on the shapes of the d2l and fast presets
(bf16, channels-last, the retained allocator as in training): the figures behind each choice of
`--kernels fast`. Median of --repeats calls after two warm-up calls; run it alone.

    .venv/bin/python benchmarks/bench_kernels.py [--repeats 7] [--json out.json]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    allocator.retain_freed_memory()
    assert kernels.available(), "the C++ kernels are not available here"
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
