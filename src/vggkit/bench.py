"""`vggkit bench`: training and inference speed of a VGG, against the machine's measured peak and
(with compare=True) against the textbook loop, measured side by side in the same process.

    result = vggkit.bench.bench(preset="d2l", compare=True)
    print(format_bench(result))

vggkit's path is the real training step of train.py: speed_settings (autocast precision,
channels-last, compile), the BatchLoader (uint8 images on the device, whole-batch resize, the
preset's flip/crop/erasing), make_optimizer, cross-entropy with the preset's label smoothing,
denormals flushed to zero on CPU, plus the CPU allocator setting of allocator.py. The textbook loop is the d2l book's: per-sample PIL bilinear resize and
ToTensor (as transforms.Resize + ToTensor in a DataLoader, here in the main process), batches
stacked, then a float32, NCHW, eager step (SGD lr 0.05, cross-entropy) on the same network,
with the glibc allocator left as a fresh Python process has it.

FLOPs: one image's forward pass costs 2 x MACs (cost.summary); a training step counts 3 x that
(forward, gradient of the activations, gradient of the weights). The first convolution needs no
input gradient, so the true figure is a little lower: FLOP/s figures are slightly generous.

The measured peak: in the same run, between timed runs, a bf16 (fp32 where the device has no
bf16) 3x3 convolution in channels-last on the network's costliest convolution shape and a
square matmul; the best rate seen is the "measured peak".

Timing: `warmup` steps first (oneDNN primitive creation, allocator growth, compilation), then
`runs` rounds; in each round vggkit and the baseline are timed one after the other (so load
from other processes hits both alike) over `steps` steps each; the figures are the medians.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import allocator as alloc
from .config import RECIPES, TrainConfig, resolve_config
from .cost import summary
from .data import Dataset, load_data
from .errors import VggkitError
from .pipeline import Augment, BatchLoader
from .specs import format_arch
from .distributed import batch_loss
from .runtime import ProcessSettings, autocast, cpu_has_bf16, pick_device, speed_settings
from .steps import train_step
from .train import make_optimizer

TEXTBOOK_LR = 0.05
RUN_SECONDS = 4.0  # auto steps: aim for runs of about this long
STORED_SIZE = 28  # random images are stored at Fashion-MNIST's size and resized like it


def bench(arch: str | None = None, ratio: int | None = None, input_size: int | None = None, in_channels: int = 1,
          batch_size: int | None = None, device: str = "auto", precision: str = "auto", channels_last: str = "auto",
          compile: str = "auto", steps: int | None = None, warmup: int | None = None, compare: bool = False,
          threads: int | None = None, *, preset: str = "d2l", runs: int = 3, data: str | None = None,
          data_dir: str | None = None, allocator: str = "auto", peak: bool = True, inference: bool = True,
          relu_inplace: bool = True, run_seconds: float = RUN_SECONDS, seed: int = 0, log=None) -> dict:
    """Measure training (and inference) images/s; see the module docstring. Returns a dict.

    arch, ratio, input_size, batch_size: None = the preset's (d2l: d2l-vgg11, 4, 224, 128); the
    model, optimizer and label smoothing are the preset's. data: None = random uint8 28x28
    images with `in_channels` channels (resized to input_size like Fashion-MNIST), or a dataset
    name / image folder for load_data (then in_channels comes from the data).
    steps / warmup: None = auto (warmup 2; steps so that a run lasts about `run_seconds`, 4 s).
    allocator: auto (retain freed memory on CPU, see allocator.py), retain or default.
    relu_inplace=False: vggkit's model with out-of-place ReLUs (to measure what in-place buys).
    """
    log = log or (lambda *a, **k: None)
    for name, value in (("steps", steps), ("warmup", warmup), ("runs", runs), ("threads", threads),
                        ("in_channels", in_channels)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise VggkitError(f"{name} must be a positive integer, got {value!r}")
    if warmup is None:
        warmup = 2
    if preset not in RECIPES:
        raise VggkitError(f"unknown preset {preset!r}; choose one of {', '.join(RECIPES)}")
    overrides = {"preset": preset, "arch": arch, "ratio": ratio, "input_size": input_size, "batch_size": batch_size,
                 "device": device, "precision": precision, "channels_last": channels_last, "compile": compile,
                 "allocator": allocator, "threads": threads, "seed": seed}
    config = resolve_config(overrides=overrides)  # checks every choice
    dev = pick_device(config.device)
    with ProcessSettings() as settings:  # threads, denormals and allocator as train() sets them; restored after
        allocator = settings.apply(config, dev)
        return _bench(config, dev, in_channels, steps, warmup, compare, preset, runs, data, data_dir, allocator, peak,
                      inference, relu_inplace, run_seconds, seed, log)


def _bench(config, dev, in_channels, steps, warmup, compare, preset, runs, data, data_dir, allocator, peak, inference,
           relu_inplace, run_seconds, seed, log) -> dict:
    speed = speed_settings(config, dev)

    dataset, data_note = _dataset(data, data_dir, in_channels, config, seed)
    channels = dataset.channels
    with torch.device("meta"):
        meta_model = config.build_model(channels, 10)
    report = summary(meta_model, batch_size=config.batch_size)
    macs = report.macs
    train_flops, infer_flops = 3 * 2 * macs, 2 * macs

    result = {
        "preset": preset, "arch": format_arch(meta_model.arch), "arch_name": config.arch,
        "ratio": config.ratio, "input_shape": list(report.input_shape), "batch_size": config.batch_size,
        "params": report.params, "macs_per_image": macs,
        "train_flops_per_image": train_flops, "infer_flops_per_image": infer_flops,
        "flops_note": "training FLOPs per image = 3 x 2 x forward MACs (cost.summary); inference = 2 x MACs",
        "device": str(dev), "device_name": device_name(dev), "threads": torch.get_num_threads(),
        "settings": speed.describe(), "precision": speed.precision, "channels_last": speed.channels_last,
        "compile": speed.compile, "allocator": allocator, "relu_inplace": relu_inplace, "data": data_note,
        "runs": runs, "warmup": warmup, "torch": torch.__version__,
    }
    load_before = _loadavg()
    cpu_before = _cpu_snapshot()

    # vggkit: the real step
    torch.manual_seed(seed)
    augment = Augment(crop_padding=config.crop_padding, flip=config.flip, erasing=config.erasing)  # the preset's
    loader = BatchLoader(dataset, config.batch_size, device=dev, input_size=config.input_size, mean=(0.0,) * channels,
                         std=(1.0,) * channels, shuffle=True, seed=seed, drop_last=True, augment=augment,
                         channels_last=speed.channels_last)
    model = config.build_model(channels, 10).to(dev)
    if not relu_inplace:
        for m in model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    step_model = torch.compile(model) if speed.compile else model
    scaler = torch.amp.GradScaler("cuda") if speed.amp_dtype == torch.float16 else None
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    batches = _cycle(loader)

    def vgg_train_step():
        x, y = next(batches)
        train_step(step_model, optimizer, scaler, speed, x, y, sums,
                   lambda logits, y: batch_loss(logits, y, len(y), config.label_smoothing))
        return len(y)

    eval_loader = BatchLoader(dataset, config.batch_size, device=dev, input_size=config.input_size,
                              mean=(0.0,) * channels, std=(1.0,) * channels, drop_last=True,
                              channels_last=speed.channels_last)
    eval_batches = _cycle(eval_loader)

    @torch.no_grad()
    def vgg_infer_step():
        x, y = next(eval_batches)
        with autocast(dev, speed):
            logits = step_model(x)
        (logits.argmax(1) == y).sum()
        return len(y)

    # the textbook loop
    if compare:
        torch.manual_seed(seed)
        base_model = config.build_model(channels, 10).to(dev)
        base_optimizer = torch.optim.SGD(base_model.parameters(), lr=TEXTBOOK_LR)
        base_loss = torch.nn.CrossEntropyLoss()
        textbook = TextbookBatches(dataset, config.batch_size, config.input_size, seed)

        def base_train_step():
            x, y = textbook.next()
            x, y = x.to(dev), y.to(dev)
            base_model.train()
            base_optimizer.zero_grad()
            y_hat = base_model(x)
            loss = base_loss(y_hat, y)
            loss.backward()
            base_optimizer.step()
            with torch.no_grad():  # d2l's metric.add(l * n, accuracy(y_hat, y), n): float() of each
                float(loss * x.shape[0]), float((y_hat.argmax(1) == y).sum()), x.shape[0]
            return len(y)

        @torch.no_grad()
        def base_infer_step():
            x, y = textbook.next()
            x, y = x.to(dev), y.to(dev)
            base_model.eval()
            float((base_model(x).argmax(1) == y).sum())
            return len(y)

    timings = {"train": [], "infer": [], "base_train": [], "base_infer": []}
    probes: dict[str, float] = {}
    probe_info: dict[str, str] = {}

    switching = compare and alloc.available() and allocator != "default"
    # warm-up (and compilation): time it, and pick the number of steps
    model.train()
    first = _timed(vgg_train_step, 1, dev)
    warm_rest = _timed(vgg_train_step, warmup - 1, dev) / max(warmup - 1, 1) if warmup > 1 else first
    per_step = warm_rest if warmup > 1 else first
    result["first_step_seconds"] = round(first, 3)
    n_train = steps or _auto_steps(per_step, run_seconds)
    if inference:
        model.eval()
        _timed(vgg_infer_step, max(warmup, 1), dev)
        n_infer = steps or _auto_steps(_timed(vgg_infer_step, 1, dev), run_seconds)
        model.train()
    if compare:
        with _textbook_settings(dev):
            b_first = _timed(base_train_step, 1, dev)
            b_per_step = _timed(base_train_step, warmup - 1, dev) / (warmup - 1) if warmup > 1 else b_first
            n_base = steps or _auto_steps(b_per_step, run_seconds)
            if inference:
                _timed(base_infer_step, max(warmup, 1), dev)
                n_base_infer = steps or _auto_steps(_timed(base_infer_step, 1, dev), run_seconds)
    log(f"steps per run: vggkit {n_train}" + (f", textbook {n_base}" if compare else "") + f"; {runs} runs")

    for r in range(runs):
        model.train()
        if switching:  # the heap was handed back for the textbook run: grow it again, untimed
            vgg_train_step()
        timings["train"].append(n_train * config.batch_size / _timed(vgg_train_step, n_train, dev))
        if inference:
            model.eval()
            if switching:
                vgg_infer_step()
            timings["infer"].append(n_infer * config.batch_size / _timed(vgg_infer_step, n_infer, dev))
            model.train()
        if peak:
            _probe(report, config, dev, probes, probe_info)
        if compare:
            with _textbook_settings(dev):
                timings["base_train"].append(n_base * config.batch_size / _timed(base_train_step, n_base, dev))
                if inference:
                    timings["base_infer"].append(
                        n_base_infer * config.batch_size / _timed(base_infer_step, n_base_infer, dev))
        log(f"run {r + 1}/{runs}: vggkit {timings['train'][-1]:.1f} img/s"
            + (f", textbook {timings['base_train'][-1]:.1f} img/s" if compare else ""))
    loss_sum, _, count = sums.tolist()
    if not math.isfinite(loss_sum):
        result["warning"] = "the loss became NaN/inf during the benchmark (speed figures still stand)"

    train_ips = statistics.median(timings["train"])
    result.update(steps=n_train, train_images_per_s=train_ips, train_images_per_s_runs=_round(timings["train"]),
                  train_flops_per_s=train_ips * train_flops)
    if inference:
        infer_ips = statistics.median(timings["infer"])
        result.update(infer_steps=n_infer, infer_images_per_s=infer_ips, infer_images_per_s_runs=_round(timings["infer"]),
                      infer_flops_per_s=infer_ips * infer_flops)
    if peak and probes:
        best_name = max(probes, key=probes.get)
        result["peak"] = {"flops_per_s": probes[best_name], "best": best_name, "probes": probes, "shapes": probe_info}
        conv = next((v for k, v in probes.items() if k.startswith("conv")), None)
        result["train_fraction_of_peak"] = result["train_flops_per_s"] / probes[best_name]
        if conv:
            result["train_fraction_of_conv_peak"] = result["train_flops_per_s"] / conv
        if inference:
            result["infer_fraction_of_peak"] = result["infer_flops_per_s"] / probes[best_name]
    if compare:
        base_ips = statistics.median(timings["base_train"])
        baseline = {"settings": "fp32, NCHW, eager; per-sample PIL resize + ToTensor; SGD lr 0.05; default allocator",
                    "steps": n_base, "train_images_per_s": base_ips, "train_images_per_s_runs": _round(timings["base_train"]),
                    "train_flops_per_s": base_ips * train_flops, "first_step_seconds": round(b_first, 3),
                    "data_seconds_per_batch": textbook.seconds / max(textbook.batches, 1)}
        if inference:
            bi = statistics.median(timings["base_infer"])
            baseline.update(infer_steps=n_base_infer, infer_images_per_s=bi, infer_images_per_s_runs=_round(timings["base_infer"]),
                            infer_flops_per_s=bi * infer_flops)
        if "peak" in result:
            baseline["train_fraction_of_peak"] = baseline["train_flops_per_s"] / result["peak"]["flops_per_s"]
        result["baseline"] = baseline
        result["speedup"] = train_ips / base_ips
        # per-run ratios (each run's vggkit and textbook figures were measured back to back)
        result["speedup_runs"] = _round([a / b for a, b in zip(timings["train"], timings["base_train"])], 3)
        if inference:
            result["infer_speedup"] = result["infer_images_per_s"] / baseline["infer_images_per_s"]
    result["load_average"] = [load_before, _loadavg()]
    result["other_processes_cpu"] = _others_cpu(cpu_before)
    result["cpu_count"] = os.cpu_count()
    return result


# ---------------------------------------------------------------------------------------------
# pieces

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


def _dataset(data, data_dir, in_channels: int, config: TrainConfig, seed: int) -> tuple[Dataset, str]:
    if data is None:
        n = config.batch_size * 4
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, STORED_SIZE, STORED_SIZE, in_channels), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.int64)
        resized = f", resized to {config.input_size}" if config.input_size != STORED_SIZE else ""
        return Dataset(images, labels, [str(i) for i in range(10)]), f"random uint8 {STORED_SIZE}x{STORED_SIZE}{resized}"
    splits = load_data(data, data_dir=data_dir, val_size=0, seed=seed, log=lambda *a, **k: None)
    train = splits.train
    if len(train) < config.batch_size:
        raise VggkitError(f"{data} has {len(train)} training images, fewer than one batch of {config.batch_size}; "
                          "use a smaller --batch-size")
    _, h, w, _ = train.images.shape
    return train, f"{splits.name} train split ({len(train):,} images {w}x{h}" + (
        f", resized to {config.input_size})" if (h, w) != (config.input_size,) * 2 else ")")


@contextmanager
def _textbook_settings(device: torch.device):
    """The textbook loop runs as a fresh process would: glibc's default allocator, denormals kept."""
    with alloc.allocator("default"):
        if device.type == "cpu":
            torch.set_flush_denormal(False)
        try:
            yield
        finally:
            if device.type == "cpu":
                torch.set_flush_denormal(True)  # back to vggkit's setting (ProcessSettings)


def _cycle(loader: BatchLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn, n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return time.perf_counter() - start


def _auto_steps(seconds_per_step: float, run_seconds: float = RUN_SECONDS) -> int:
    return max(2, min(100, math.ceil(run_seconds / max(seconds_per_step, 1e-6))))


def _round(values, digits=1):
    return [round(v, digits) for v in values]


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall time), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(values[:8]) - idle) / ticks, own.user + own.system, time.perf_counter()


def _others_cpu(before) -> float | None:
    """CPU cores other processes kept busy on average since `before` (machine busy time - ours)."""
    after = _cpu_snapshot()
    if before is None or after is None:
        return None
    wall = after[2] - before[2]
    return round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / max(wall, 1e-9), 2)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "CPU"
    return device.type


def probe_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float32


def _probe(report, config: TrainConfig, device: torch.device, probes: dict, info: dict, repeats: int = 4) -> None:
    """Best FLOP/s of a 3x3 convolution (the network's costliest) and a square matmul; updates `probes`."""
    dtype = probe_dtype(device)
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    convs = [(r.macs, i) for i, r in enumerate(report.layers) if r.kind == "Conv2d"]
    budget = 3e10 if device.type == "cpu" else 1e12  # FLOPs per probe call
    if convs:
        macs, i = max(convs)
        out = report.layers[i].output_shape
        cin = macs // (out[0] * out[1] * out[2] * 9)
        batch = max(1, min(config.batch_size, int(budget // (2 * macs))))
        x = torch.randn(batch, cin, out[1], out[2], device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(out[0], cin, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        b = torch.zeros(out[0], device=device, dtype=dtype)
        flops = 2 * macs * batch
        F.conv2d(x, w, b, padding=1)
        rate = max(flops / _timed(lambda: F.conv2d(x, w, b, padding=1), 1, device) for _ in range(repeats))
        name = f"conv_{tag}"
        probes[name] = max(probes.get(name, 0.0), rate)
        info[name] = f"3x3 conv {cin}->{out[0]} at {out[1]}x{out[2]}, batch {batch}, channels-last"
        del x, w, b
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    rate = max(2 * n**3 / _timed(lambda: torch.mm(a, b, out=c), 1, device) for _ in range(repeats))
    name = f"matmul_{tag}"
    probes[name] = max(probes.get(name, 0.0), rate)
    info[name] = f"{n}x{n} @ {n}x{n}"


# ---------------------------------------------------------------------------------------------
# formatting

def _si(value: float, unit: str = "") -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def format_bench(r: dict) -> str:
    base = r.get("baseline")
    shape = "x".join(map(str, r["input_shape"]))
    lines = [
        f"vggkit bench: {r['arch_name']}" + (f"/{r['ratio']}" if r["ratio"] != 1 else "")
        + f" ({r['arch']}), input {shape}, batch {r['batch_size']}, {r['params']:,} params, "
        f"{r['macs_per_image'] / 1e9:.3f} GMACs/image",
        f"device: {r['device']} ({r['device_name']}, {r['threads']} threads); vggkit: {r['settings'] or 'fp32'}, "
        f"allocator {r['allocator']}; data: {r['data']}",
    ]
    col = 14
    header = f"{'':<26}{'vggkit':>{col}}" + (f"{'textbook':>{col}}{'ratio':>9}" if base else "")
    lines += ["", header]

    def row(label, key, fmt):
        value = r.get(key)
        if value is None:
            return
        text = f"{label:<26}{fmt(value):>{col}}"
        if base and base.get(key) is not None:
            text += f"{fmt(base[key]):>{col}}{value / base[key]:>8.2f}x"
        lines.append(text)

    row("train images/s", "train_images_per_s", lambda v: f"{v:.1f}")
    row("train FLOP/s", "train_flops_per_s", lambda v: _si(v, "FLOP/s"))
    row("train fraction of peak", "train_fraction_of_peak", lambda v: f"{100 * v:.1f}%")
    row("inference images/s", "infer_images_per_s", lambda v: f"{v:.1f}")
    row("inference FLOP/s", "infer_flops_per_s", lambda v: _si(v, "FLOP/s"))
    lines.append("")
    if "peak" in r:
        p = r["peak"]
        parts = ", ".join(f"{k} {_si(v, 'FLOP/s')} ({p['shapes'][k]})" for k, v in p["probes"].items())
        lines.append(f"measured peak: {_si(p['flops_per_s'], 'FLOP/s')} ({p['best']}); probes: {parts}")
        if "train_fraction_of_conv_peak" in r:
            lines.append(f"vggkit training reaches {100 * r['train_fraction_of_conv_peak']:.1f}% of the convolution "
                         f"probe and {100 * r['train_fraction_of_peak']:.1f}% of the measured peak")
    lines.append(f"training FLOPs per image = 3 x 2 x forward MACs (cost.summary) = "
                 f"{r['train_flops_per_image'] / 1e9:.3f} GFLOP; inference = 2 x MACs")
    if base:
        lines.append(f"textbook loop: {base['settings']}; its per-sample data pipeline took "
                     f"{1e3 * base['data_seconds_per_batch']:.1f} ms per batch")
        lines.append(f"training speed-up: {r['speedup']:.2f}x (per run: "
                     f"{', '.join(f'{s:.2f}x' for s in r['speedup_runs'])})")
    runs = f"median of {r['runs']} run{'s' if r['runs'] != 1 else ''} of {r['steps']} steps (after {r['warmup']} warm-up; " \
           f"first step {r['first_step_seconds']:.2f} s)"
    lines.append(runs)
    load = r.get("load_average") or [None, None]
    others = r.get("other_processes_cpu")
    if others is not None and r.get("cpu_count"):
        lines.append(f"other processes kept {others:.2f} of {r['cpu_count']} CPUs busy during the benchmark"
                     + ("; figures may be low (shared machine)" if others > 0.1 * r["cpu_count"] else "")
                     + f"; load average {load[0]:.2f} -> {load[1]:.2f}")
    if r.get("warning"):
        lines.append(f"warning: {r['warning']}")
    return "\n".join(lines)
