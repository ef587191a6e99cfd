"""How a trained model runs batches for inference: eagerly, or compiled by torch.compile where that
measures faster on this machine. Used by evaluate, predict and the benchmarks.

    forward = InferenceRunner(model, speed, device, images=10_000, batch_size=512, compile="auto")
    logits = forward(x)      # as model(x), under no_grad and the speed's autocast

The first batch of `batch_size` images fixes the compiled shape (torch.compile with dynamic=False);
a batch of another shape (the last, smaller one) runs eagerly rather than compiling a second graph.

compile="off": eager, the model called exactly as before. "on": compiled; where compiling fails,
one line says why and the batches run eagerly. "auto": whichever measured faster here. The decision
is kept in <cache>/vggkit/inference.json (<cache>: $XDG_CACHE_HOME or ~/.cache, as the kernels'
build), keyed by torch version, CPU (or GPU), threads, the model's config, input shape, batch size,
dtype and memory format. Without one, a job whose eager time (its first batch's time x images)
could pay for a compile (the shortest compile measured here so far, DEFAULT_COMPILE_SECONDS before
any) is measured: eager and compiled on the same batch, TIMED_REPEATS times each, the faster kept;
smaller jobs run eagerly without measuring. A cached "compiled" is used where images x the saving
per image exceeds the compile time measured. Every decision comes from a measurement on this machine.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from datetime import date
from pathlib import Path

import torch

from .atomic import NotAFile, atomic_write_text
from .config import CHOICES
from .errors import VggkitError
from .kernels import build
from .runtime import Speed, autocast, synchronize

COMPILE_POLICIES = CHOICES["compile"]  # auto, on, off
DEFAULT_COMPILE_SECONDS = 60.0  # what a compile is assumed to cost before one was measured here
TIMED_REPEATS = 2  # timed calls of each path on the same batch, alternately; the fastest of each counts
CACHE_VERSION = 2  # 2: eager inference got vggkit's kernels (issue 15, sixth step); older decisions are stale


def check_policy(policy) -> str:
    if policy not in COMPILE_POLICIES:
        raise VggkitError(f"compile must be one of {', '.join(COMPILE_POLICIES)}, got {policy!r}")
    return policy


def forward_pass(module, x: torch.Tensor, speed: Speed, device: torch.device) -> torch.Tensor:
    """module(x) for inference: no gradients, under the speed's autocast."""
    with torch.no_grad(), autocast(device, speed):
        return module(x)


def decisions_path() -> Path:
    return build.cache_root().parent / "inference.json"


def compile_for_inference(model: torch.nn.Module, device: torch.device):
    """torch.compile for inference: one static shape (others run eagerly) and, on the CPU, the weights
    frozen into the graph (inductor's freezing: folded and pre-packed, as PyTorch advises for CPU
    inference). Frozen weights are copies: train the model further and the compiled one does not see it."""
    return torch.compile(model, dynamic=False, options={"freezing": True} if device.type == "cpu" else None)


@dataclass
class Decision:
    """A measured choice between eager and compiled inference, as the cache stores it."""
    choice: str  # "compiled" or "eager"
    eager_seconds_per_image: float
    compiled_seconds_per_image: float | None = None  # None: compiling failed
    compile_seconds: float | None = None  # the first compiled call (compiling included)
    measured: str = ""  # the date
    error: str | None = None  # why compiling failed

    @classmethod
    def from_record(cls, record) -> Decision | None:
        """The decision a cache record holds, or None for one that is not (damaged, another version)."""
        try:
            decision = cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})
        except (TypeError, KeyError):
            return None
        numbers = (decision.eager_seconds_per_image, decision.compiled_seconds_per_image, decision.compile_seconds)
        if decision.choice not in ("compiled", "eager") or not all(
                v is None or (isinstance(v, (int, float)) and v >= 0) for v in numbers):
            return None
        if decision.choice == "compiled" and None in numbers:
            return None
        return decision

    @property
    def saving_per_image(self) -> float:
        if self.compiled_seconds_per_image is None:
            return 0.0
        return self.eager_seconds_per_image - self.compiled_seconds_per_image

    def describe(self) -> str:
        if self.error:
            return f"eager, torch.compile failed ({self.error})"
        speedup = self.eager_seconds_per_image / max(self.compiled_seconds_per_image, 1e-12)
        if self.choice == "compiled":
            return f"compiled, {speedup:.2f}x eager"
        return f"eager, compiled {speedup:.2f}x eager"


class DecisionCache:
    """Measured decisions in one JSON file. A file that cannot be read as one is ignored, and replaced
    whole (vggkit.atomic) by the next decision; one that cannot be written leaves the decision unkept."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else decisions_path()

    def records(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(
                data.get("decisions"), dict):
            return {}
        return {k: r for k, r in data["decisions"].items()
                if isinstance(r, dict) and isinstance(r.get("key"), dict) and Decision.from_record(r)}

    def get(self, key: dict) -> Decision | None:
        record = self.records().get(key_id(key))
        return Decision.from_record(record) if record else None

    def put(self, key: dict, decision: Decision) -> bool:
        """Store the decision; False where the file cannot be written."""
        records = self.records() | {key_id(key): {"key": key, **asdict(decision)}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "decisions": records}, indent=1,
                                                    sort_keys=True) + "\n")
        except (OSError, NotAFile):  # NotAFile: a link or a device at its name, never written through
            return False
        return True

    def compile_seconds_so_far(self, key: dict) -> float:
        """The shortest compile measured with this torch on this machine (DEFAULT_COMPILE_SECONDS before
        any): the least a compile costs, so a job with less eager time cannot pay one back."""
        measured = [r["compile_seconds"] for r in self.records().values()
                    if r.get("compile_seconds") and all(r["key"].get(k) == key[k] for k in ("torch", "machine"))]
        return min(measured, default=DEFAULT_COMPILE_SECONDS)


def decision_key(model: torch.nn.Module, speed: Speed, device: torch.device, shape: tuple[int, ...]) -> dict:
    """What makes eager or compiled faster: torch, the machine, the model, the batch and its format."""
    machine = build.cpu_fingerprint() + (f"\n{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    describe = getattr(model, "config", None)
    kernels = sorted({m.kernels for m in model.modules() if hasattr(m, "kernels") and isinstance(m.kernels, str)})
    return {"torch": torch.__version__, "machine": hashlib.sha256(machine.encode()).hexdigest()[:16],
            "device": device.type, "threads": torch.get_num_threads(),
            "model": describe() if callable(describe) else repr(model), "kernels": kernels,
            "input": list(shape[1:]), "batch_size": shape[0], "dtype": speed.precision,
            "memory_format": "channels_last" if speed.channels_last else "contiguous"}


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class InferenceRunner:
    """model(x) for inference, eager or compiled by `compile` ("auto", "on", "off"; see the module
    docstring). `batch_size`: images in the job's full batches; `images`: how many it runs (what
    "auto" weighs a compile against; optional otherwise). Puts the model in eval mode. `log(line)`
    receives the one line about the choice (default: stderr). `cache`, `clock` and
    `compiler(model, device)` can be replaced (tests)."""

    def __init__(self, model: torch.nn.Module, speed: Speed, device: torch.device, *, batch_size: int,
                 images: int | None = None, compile: str = "auto", log=None, cache: DecisionCache | None = None,
                 clock=time.perf_counter, compiler=None):
        self.policy = check_policy(compile)
        if images is None and self.policy == "auto":
            raise TypeError("compile='auto' weighs a compile against the job: give the number of images")
        self.model, self.speed, self.device = model.eval(), speed, torch.device(device)
        self.images = images
        self.batch_size = batch_size if images is None else min(batch_size, max(images, 1))  # a job's first batch
        if callable(getattr(model, "config", None)):  # a VGG: its batches must fit the device (bounds.py)
            from .bounds import check_inference_fits

            check_inference_fits(model.config(), self.batch_size, self.device)
        self.log, self.cache, self.clock = log or build.note, cache or DecisionCache(), clock
        self.compiler = compiler or compile_for_inference
        self.path = "eager" if self.policy == "off" else None  # None: decided at the first full batch
        self.batch_shape: tuple[int, ...] | None = None  # the full batches' shape, the compiled one
        self.compiled_model = None
        self.decision: Decision | None = None  # what "auto" measured or found cached
        self.failure: str | None = None  # why compiling failed

    @property
    def compiled(self) -> bool:
        """Whether full batches run compiled (once decided)."""
        return self.path == "compiled"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is None and len(x) == self.batch_size:
            self.batch_shape = tuple(x.shape)
            return self._first_full_batch(x)
        if self.path == "compiled" and tuple(x.shape) == self.batch_shape:
            return self._run(self.compiled_model, x)
        return self._run(self.model, x)

    def _run(self, module, x: torch.Tensor) -> torch.Tensor:
        return forward_pass(module, x, self.speed, self.device)

    def _first_full_batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.policy == "on":
            return self._compile_and_run(x)
        key = decision_key(self.model, self.speed, self.device, self.batch_shape)
        known = self.cache.get(key)
        if known is not None:
            return self._follow(known, x)
        out, seconds = self._timed(self.model, x)
        if self.images * seconds / len(x) <= self.cache.compile_seconds_so_far(key):
            self.path = "eager"  # too small a job for a compile to pay back: nothing measured
            return out
        self.decision = self._measure(x, seconds)
        kept = self.cache.put(key, self.decision)
        where = f"cached in {self.cache.path}" if kept else f"not cached: cannot write {self.cache.path}"
        self.log(f"inference: {self.decision.describe()} (measured once, {where})")
        return out

    def _follow(self, decision: Decision, x: torch.Tensor) -> torch.Tensor:
        """A cached decision: compiled where this job's saving exceeds the compile time measured."""
        self.decision = decision
        if decision.choice == "compiled" and self.images * decision.saving_per_image > decision.compile_seconds:
            self.log(f"inference: {decision.describe()} (measured {decision.measured}, cached in {self.cache.path})")
            return self._compile_and_run(x)
        self.path = "eager"
        return self._run(self.model, x)

    def _compile_and_run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            compiled = self.compiler(self.model, self.device)
            out = self._run(compiled, x)
        except Exception as e:  # noqa: BLE001  any failure to compile (no compiler, an unsupported op): eager works
            self.failure, self.path = _first_line(e), "eager"
            self.log(f"inference: eager, torch.compile failed ({self.failure}); the model runs uncompiled")
            return self._run(self.model, x)
        self.compiled_model, self.path = compiled, "compiled"
        return out

    def _measure(self, x: torch.Tensor, first_eager_seconds: float) -> Decision:
        """Compile, then time eager and compiled alternately on batch x; the faster path is taken."""
        n, today = len(x), date.today().isoformat()
        try:
            compiled = self.compiler(self.model, self.device)
            _, compile_seconds = self._timed(compiled, x)
        except Exception as e:  # noqa: BLE001  as in _compile_and_run
            self.failure, self.path = _first_line(e), "eager"
            return Decision("eager", first_eager_seconds / n, measured=today, error=self.failure)
        eager, fast = [], []
        for _ in range(TIMED_REPEATS):
            eager.append(self._timed(self.model, x)[1])
            fast.append(self._timed(compiled, x)[1])
        faster = min(fast) < min(eager)
        self.path = "compiled" if faster else "eager"
        self.compiled_model = compiled if faster else None
        return Decision(self.path, min(eager) / n, min(fast) / n, compile_seconds, today)

    def _timed(self, module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        synchronize(self.device)
        start = self.clock()
        out = self._run(module, x)
        synchronize(self.device)
        return out, self.clock() - start


def _first_line(error: BaseException) -> str:
    """The error's type and first line (torch.compile's failures run to pages)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
