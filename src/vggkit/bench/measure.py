"""`vggkit bench`: training and inference speed of a VGG, against the machine's measured peak and
(with compare=True) against the textbook loop, measured side by side in the same process.

    from vggkit.bench import BenchSettings, bench
    from vggkit.bench import format_bench
    result = bench(preset="d2l", compare=True)       # the same as bench(BenchSettings(preset="d2l", compare=True))
    print(format_bench(result))

vggkit's path is the real training step of train.py: speed_settings (autocast precision,
channels-last, compile, kernels: `kernels="plain"` times the network and optimizer step as they
were before vggkit's CPU kernels and the fused optimizer step), the BatchLoader (uint8 images on
the device, whole-batch resize, the recipe's flip/crop/erasing), make_optimizer, cross-entropy
with the recipe's label smoothing, denormals flushed to zero on CPU, plus the CPU allocator
setting of allocator.py. Inference runs as `vggkit evaluate` runs it (inference.InferenceRunner):
eagerly, and with compile="on" compiled as well (figures of its own, and the compile time). The
textbook loop (the d2l book's) is in textbook.py, the measured peak in peak.py, the text in
report.py, `--profile` (a step's time by group of ops) in profile.py, vggkit's own steps (VggkitSteps)
in vggkit_steps.py.

FLOPs: one image's forward pass costs 2 x MACs (cost.summary); a training step counts 3 x that
(forward, gradient of the activations, gradient of the weights). The first convolution needs no
input gradient, so the true figure is a little lower: FLOP/s figures are slightly generous.

Timing: `warmup` steps first (oneDNN primitive creation, allocator growth, compilation), then
`runs` rounds; in each round vggkit and the baseline are timed one after the other (so load
from other processes hits both alike) over `steps` steps each; the figures are the medians.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from .. import allocator as alloc
from ..bounds import check_training_fits
from .data import bench_folder
from .peak import PeakProbe
from .textbook import TEXTBOOK_SETTINGS, TextbookBatches, TextbookSteps
from .vggkit_steps import NUM_CLASSES, VggkitSteps
from ..config import DEFAULT_RECIPE, RECIPES, TrainConfig, resolve_config
from ..cost import Report, summary
from ..data import Dataset, load_data
from ..data.load import is_folder
from ..decide import LIKE_FASHION_MNIST, decide
from ..errors import VggkitError
from .machine import RUN_SECONDS, auto_steps, cpu_snapshot, device_name, load_average, others_cpu, timed
from ..runtime import ProcessSettings, pick_device, speed_settings
from ..specs import format_arch

DEFAULT_WARMUP = 2
STORED_SIZE = 28  # random images are stored at Fashion-MNIST's size and resized like it
TRAIN_FLOPS_PER_MAC = 3 * 2  # forward, gradient of the activations, gradient of the weights; 2 FLOPs a MAC
INFER_FLOPS_PER_MAC = 2
FLOPS_NOTE = "training FLOPs per image = 3 x 2 x forward MACs (cost.summary); inference = 2 x MACs"


@dataclass
class BenchSettings:
    """What `bench` measures. None: the recipe's value (model, batch size) or automatic (steps, warmup)."""
    preset: str = DEFAULT_RECIPE  # the recipe (config.RECIPES), as train's: model, optimizer, label smoothing, augmentation
    arch: str | None = None
    ratio: int | None = None
    input_size: int | None = None
    batch_size: int | None = None
    in_channels: int = 1  # channels of the random images (data=None)
    data: str | None = None  # None: random uint8 28x28 images; else a dataset name or image folder for load_data
    data_dir: str | None = None
    # speed choices, as `vggkit train` makes them
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    compile: str = "auto"
    allocator: str = "auto"  # auto (retain freed memory on CPU, see allocator.py), retain or default
    threads: int | None = None
    kernels: str = "fast"  # fast|plain ("auto" = fast): vggkit's CPU kernels (vggkit.kernels) or the network as it was
    # how to measure
    steps: int | None = None  # steps per timed run; None: runs of about `run_seconds`
    warmup: int | None = None  # steps (`vggkit bench --warmup-steps`); None: DEFAULT_WARMUP steps
    runs: int = 3
    run_seconds: float = RUN_SECONDS
    compare: bool = False  # also time the textbook loop
    peak: bool = True  # probe the machine's peak FLOP/s between runs
    inference: bool = True
    relu_inplace: bool = True  # False: vggkit's model with out-of-place ReLUs (what in-place buys)
    seed: int = 0

    CONFIG_FIELDS = ("preset", "arch", "ratio", "input_size", "batch_size", "device", "precision", "channels_last",
                     "compile", "allocator", "threads", "kernels", "seed")

    def check(self) -> None:
        for name in ("steps", "warmup", "runs", "threads", "in_channels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise VggkitError(f"{name} must be a positive integer, got {value!r}")
        if self.preset not in RECIPES:
            raise VggkitError(f"unknown preset {self.preset!r}; choose one of {', '.join(RECIPES)}")

    def train_config(self) -> TrainConfig:
        """The recipe with this bench's model, batch and speed choices (every choice checked); what the
        recipe leaves to the data is decided as for Fashion-MNIST, which the random images stand for."""
        config = resolve_config(overrides={name: getattr(self, name) for name in self.CONFIG_FIELDS})
        return decide(config, LIKE_FASHION_MNIST)[0]


def bench(settings: BenchSettings | None = None, *, log=None, **changes) -> dict:
    """Measure training (and inference) images/s; see the module docstring. Returns a dict.

    `settings` (default: BenchSettings()) with `changes` to its fields, e.g. bench(preset="fast", runs=5).
    `log(text)` receives progress lines.
    """
    settings = replace(settings or BenchSettings(), **changes)
    settings.check()
    if settings.warmup is None:
        settings = replace(settings, warmup=DEFAULT_WARMUP)
    if settings.data is not None and is_folder(settings.data):  # photos on disk: the data path against the compute
        result = bench_folder(settings, log)
        if result is not None:
            return result
    config = settings.train_config()
    device = pick_device(config.device)
    channels = settings.in_channels if settings.data is None else 1  # a data set's: 1 at least
    check_training_fits(config, config.model_arguments(channels, NUM_CLASSES), device,
                        speed_settings(config, device).amp_dtype)
    with ProcessSettings() as process:  # threads, denormals and allocator as train() sets them; restored after
        allocator = process.apply(config, device)
        return Measurement(settings, config, device, allocator, log).run()


# ---------------------------------------------------------------------------------------------
# What is timed

class Steps(Protocol):
    """One contender: vggkit (VggkitSteps) or the textbook loop (textbook.TextbookSteps)."""

    def settings(self):
        """The context its steps run in."""

    def mode(self, training: bool) -> None: ...

    def train_step(self) -> int:
        """One training step; returns the number of images."""

    def infer_step(self) -> int: ...


@dataclass
class Plan:
    """What the warm-up found: the first step's time, and the steps per timed run."""
    first_step_seconds: float
    train_steps: int
    infer_steps: int | None  # None: inference is not measured
    compile_seconds: float | None = None  # the first compiled inference batch, compiling included


@dataclass
class Rates:
    """Images/s of each timed run."""
    train: list[float] = field(default_factory=list)
    infer: list[float] = field(default_factory=list)
    infer_compiled: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The measurement

class Measurement:
    """One `bench` call: the contenders warmed up, then timed round by round; the result as a dict."""

    def __init__(self, settings: BenchSettings, config: TrainConfig, device: torch.device, allocator: str, log=None):
        self.settings, self.config, self.device, self.allocator = settings, config, device, allocator
        self.log = log or (lambda *a, **k: None)
        self.speed = speed_settings(config, device)

    def run(self) -> dict:
        settings, config = self.settings, self.config
        dataset, data_note = bench_dataset(settings, config)
        arch, report = cost_report(config, dataset.channels)
        result = self._describe(arch, report, data_note)
        load_before, cpu_before = load_average(), cpu_snapshot()
        vggkit = VggkitSteps(config, self.speed, self.device, dataset, settings.seed, settings.relu_inplace)
        result["kernels"] = vggkit.kernels
        textbook = TextbookSteps(config, self.device, dataset, settings.seed) if settings.compare else None
        plan = self._warm_up(vggkit)
        result["first_step_seconds"] = round(plan.first_step_seconds, 3)
        base_plan = self._warm_up(textbook) if textbook else None
        self.log(f"steps per run: vggkit {plan.train_steps}"
                 + (f", textbook {base_plan.train_steps}" if textbook else "") + f"; {settings.runs} runs")
        probe = PeakProbe(report, config.batch_size, self.device) if settings.peak else None
        rates, base_rates = self._rounds(vggkit, plan, textbook, base_plan, probe)
        if vggkit.compiled_infer and vggkit.compiled_infer.failure:
            result["infer_compile_error"] = vggkit.compiled_infer.failure
        if not vggkit.loss_is_finite():
            result["warning"] = "the loss became NaN/inf during the benchmark (speed figures still stand)"
        result.update(_train_figures(rates, plan, report.macs), **_infer_figures(rates, plan, report.macs))
        if probe and probe.probes:
            result.update(probe.figures(result))
        if textbook:
            result.update(_comparison(result, rates, base_rates, base_plan, textbook.batches, report.macs))
        result.update(load_average=[load_before, load_average()], other_processes_cpu=others_cpu(cpu_before),
                      cpu_count=os.cpu_count())
        return result

    def _describe(self, arch: str, report: Report, data_note: str) -> dict:
        """The result's first part: what is measured, on what, with which settings."""
        config, speed, macs = self.config, self.speed, report.macs
        return {
            "preset": self.settings.preset, "arch": arch, "arch_name": config.arch,
            "ratio": config.ratio, "input_shape": list(report.input_shape), "batch_size": config.batch_size,
            "params": report.params, "macs_per_image": macs,
            "train_flops_per_image": TRAIN_FLOPS_PER_MAC * macs, "infer_flops_per_image": INFER_FLOPS_PER_MAC * macs,
            "flops_note": FLOPS_NOTE,
            "device": str(self.device), "device_name": device_name(self.device), "threads": torch.get_num_threads(),
            "settings": speed.describe(), "precision": speed.precision, "channels_last": speed.channels_last,
            "compile": speed.compile, "allocator": self.allocator, "relu_inplace": self.settings.relu_inplace,
            "data": data_note, "runs": self.settings.runs, "warmup": self.settings.warmup, "torch": torch.__version__,
        }

    def _warm_up(self, steps: Steps) -> Plan:
        """Warm-up steps (and compilation), timed: the steps per run follow from them."""
        warmup, fixed, seconds = self.settings.warmup, self.settings.steps, self.settings.run_seconds
        with steps.settings():
            steps.mode(training=True)
            first = timed(steps.train_step, 1, self.device)
            per_step = timed(steps.train_step, warmup - 1, self.device) / (warmup - 1) if warmup > 1 else first
            infer_steps = compile_seconds = None
            if self.settings.inference:
                steps.mode(training=False)
                timed(steps.infer_step, warmup, self.device)
                infer_steps = fixed or auto_steps(timed(steps.infer_step, 1, self.device), seconds)
                if _compiles_inference(steps):
                    compile_seconds = timed(steps.compiled_infer_step, 1, self.device)
                    timed(steps.compiled_infer_step, warmup - 1, self.device)
                steps.mode(training=True)
        return Plan(first, fixed or auto_steps(per_step, seconds), infer_steps, compile_seconds)

    def _rounds(self, vggkit: VggkitSteps, plan: Plan, textbook: TextbookSteps | None, base_plan: Plan | None,
                probe: PeakProbe | None) -> tuple[Rates, Rates]:
        """The timed runs: vggkit, the peak probes, the textbook loop, one after the other in each round."""
        rates, base_rates = Rates(), Rates()
        # the textbook loop runs on glibc's default allocator, which hands the heap back: vggkit's first
        # step after it grows the heap again, untimed
        regrow = textbook is not None and alloc.available() and self.allocator != "default"
        for r in range(self.settings.runs):
            self._time_run(vggkit, plan, rates, regrow)
            if probe:
                probe.measure()
            if textbook:
                self._time_run(textbook, base_plan, base_rates, regrow=False)
            self.log(f"run {r + 1}/{self.settings.runs}: vggkit {rates.train[-1]:.1f} img/s"
                     + (f", textbook {base_rates.train[-1]:.1f} img/s" if textbook else ""))
        return rates, base_rates

    def _time_run(self, steps: Steps, plan: Plan, rates: Rates, regrow: bool) -> None:
        batch_size = self.config.batch_size
        with steps.settings():
            steps.mode(training=True)
            if regrow:
                steps.train_step()
            rates.train.append(plan.train_steps * batch_size / timed(steps.train_step, plan.train_steps, self.device))
            if plan.infer_steps is not None:
                steps.mode(training=False)
                if regrow:
                    steps.infer_step()
                rates.infer.append(plan.infer_steps * batch_size
                                   / timed(steps.infer_step, plan.infer_steps, self.device))
                if _compiles_inference(steps) and steps.compiled_infer.compiled:
                    rates.infer_compiled.append(plan.infer_steps * batch_size
                                                / timed(steps.compiled_infer_step, plan.infer_steps, self.device))
                steps.mode(training=True)


# ---------------------------------------------------------------------------------------------
# The result's parts

def _train_figures(rates: Rates, plan: Plan, macs: int) -> dict:
    images_per_s = statistics.median(rates.train)
    return {"steps": plan.train_steps, "train_images_per_s": images_per_s,
            "train_images_per_s_runs": _round(rates.train),
            "train_flops_per_s": images_per_s * (TRAIN_FLOPS_PER_MAC * macs)}


def _infer_figures(rates: Rates, plan: Plan, macs: int) -> dict:
    """Eager inference, and compiled inference where it was timed."""
    if plan.infer_steps is None:
        return {}
    images_per_s = statistics.median(rates.infer)
    figures = {"infer_steps": plan.infer_steps, "infer_images_per_s": images_per_s,
               "infer_images_per_s_runs": _round(rates.infer),
               "infer_flops_per_s": images_per_s * (INFER_FLOPS_PER_MAC * macs)}
    if rates.infer_compiled:
        compiled = statistics.median(rates.infer_compiled)
        figures |= {"infer_compiled_images_per_s": compiled, "infer_compiled_images_per_s_runs":
                    _round(rates.infer_compiled), "infer_compiled_speedup": compiled / images_per_s,
                    "infer_compile_seconds": round(plan.compile_seconds, 3)}
    return figures


def _comparison(result: dict, rates: Rates, base_rates: Rates, base_plan: Plan, batches: TextbookBatches,
                macs: int) -> dict:
    """The textbook loop's figures ("baseline") and vggkit's speed-up over it."""
    baseline = {"settings": TEXTBOOK_SETTINGS, **_train_figures(base_rates, base_plan, macs),
                "first_step_seconds": round(base_plan.first_step_seconds, 3),
                "data_seconds_per_batch": batches.seconds_per_batch, **_infer_figures(base_rates, base_plan, macs)}
    if "peak" in result:
        baseline["train_fraction_of_peak"] = baseline["train_flops_per_s"] / result["peak"]["flops_per_s"]
    out = {"baseline": baseline, "speedup": result["train_images_per_s"] / baseline["train_images_per_s"],
           # per-run ratios (each run's vggkit and textbook figures were measured back to back)
           "speedup_runs": _round([a / b for a, b in zip(rates.train, base_rates.train)], 3)}
    if "infer_images_per_s" in baseline:
        out["infer_speedup"] = result["infer_images_per_s"] / baseline["infer_images_per_s"]
    return out


# ---------------------------------------------------------------------------------------------
# Pieces

def bench_dataset(settings: BenchSettings, config: TrainConfig) -> tuple[Dataset, str]:
    """The images to train on, and a note saying what they are."""
    if settings.data is None:
        n = config.batch_size * 4
        rng = np.random.default_rng(settings.seed)
        images = rng.integers(0, 256, (n, STORED_SIZE, STORED_SIZE, settings.in_channels), dtype=np.uint8)
        labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
        resized = f", resized to {config.input_size}" if config.input_size != STORED_SIZE else ""
        return (Dataset(images, labels, [str(i) for i in range(NUM_CLASSES)]),
                f"random uint8 {STORED_SIZE}x{STORED_SIZE}{resized}")
    splits = load_data(settings.data, data_dir=settings.data_dir, val_size=0, seed=settings.seed,
                       log=lambda *a, **k: None)
    train = splits.train
    if len(train) < config.batch_size:
        raise VggkitError(f"{settings.data} has {len(train)} training images, fewer than one batch of "
                          f"{config.batch_size}; use a smaller --batch-size")
    _, h, w, _ = train.images.shape
    return train, f"{splits.name} train split ({len(train):,} images {w}x{h}" + (
        f", resized to {config.input_size})" if (h, w) != (config.input_size,) * 2 else ")")


def cost_report(config: TrainConfig, channels: int) -> tuple[str, Report]:
    """The architecture as a string, and the cost report of one batch (on the meta device: no memory)."""
    with torch.device("meta"):
        model = config.build_model(channels, NUM_CLASSES)
    return format_arch(model.arch), summary(model, batch_size=config.batch_size)


def _compiles_inference(steps: Steps) -> bool:
    """Whether `steps` times compiled inference too (vggkit's, with --compile on)."""
    return isinstance(steps, VggkitSteps) and steps.compiled_infer is not None


def _round(values, digits=1):
    return [round(v, digits) for v in values]
