"""Inference eager or compiled (vggkit.inference): the "auto" decision on a fake clock and a fake
compiler (faster path kept, small jobs not measured, the cache and its key, a damaged cache file),
compile failures falling back, one real torch.compile of a tiny model giving eager's predictions,
and evaluate/predict with --compile. No timing assertions."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vggkit.inference as inference
from vggkit.checkpoint import save_checkpoint
from vggkit.cli import main
from vggkit.errors import VggkitError
from vggkit.evaluate import evaluate
from vggkit.inference import DEFAULT_COMPILE_SECONDS, DecisionCache, InferenceRunner, decision_key
from vggkit.model import VGG
from vggkit.pipeline import BatchLoader
from vggkit.predict import image_paths, model_inputs, predict_logits
from vggkit.preprocess import preprocess_meta, settings_from_meta
from vggkit.runtime import Speed
from vggkit.steps import evaluate_loader

from helpers import like_trained

FP32 = Speed(amp_dtype=None, channels_last=False, compile=False)
BF16_NHWC = Speed(amp_dtype=torch.bfloat16, channels_last=True, compile=False)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Decisions go to a cache of the test's own, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Timed(nn.Module):
    """`inner` that takes `seconds_per_image` on the fake clock and counts its calls."""

    def __init__(self, inner: nn.Module, clock: Clock, seconds_per_image: float):
        super().__init__()
        self.inner, self.clock, self.seconds_per_image, self.calls = inner, clock, seconds_per_image, 0

    def config(self):
        return self.inner.config()

    def forward(self, x):
        self.calls += 1
        self.clock.now += self.seconds_per_image * len(x)
        return self.inner(x)


class Setup:
    """A tiny model on a fake clock, a fake compiler (counting its compiles), a cache in tmp_path."""

    def __init__(self, tmp_path, eager_seconds: float, compiled_seconds: float, compile_seconds: float = 5.0):
        torch.manual_seed(0)
        self.clock = Clock()
        tiny = VGG("1x4", in_channels=1, num_classes=3, input_size=8, fc_width=8)
        self.model = Timed(tiny, self.clock, eager_seconds)
        self.compiled_seconds, self.compile_seconds = compiled_seconds, compile_seconds
        self.compiles, self.compiled = 0, None
        self.cache = DecisionCache(tmp_path / "cache" / "inference.json")
        self.lines = []

    def compiler(self, model, device):
        self.compiles += 1
        self.compiled = Timed(model.inner, self.clock, self.compiled_seconds)
        compile_once = self.compile_seconds

        def first_call_compiles(module, args):
            self.clock.now += compile_once
            hook.remove()
        hook = self.compiled.register_forward_pre_hook(first_call_compiles)
        return self.compiled

    def runner(self, images: int, batch_size: int = 4, speed: Speed = FP32, compile: str = "auto"):
        return InferenceRunner(self.model, speed, CPU, images=images, batch_size=batch_size, compile=compile,
                               log=self.lines.append, cache=self.cache, clock=self.clock, compiler=self.compiler)


def batches(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=generator) for n in sizes]


def test_compiled_faster_is_kept_measured_once_and_cached(tmp_path):
    s = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)
    runner = s.runner(images=10_000)  # 200 s eager: worth measuring
    xs = batches([4, 4, 4, 2])
    outputs = [runner(x) for x in xs]
    assert runner.compiled and s.compiles == 1
    assert s.model.calls == 1 + inference.TIMED_REPEATS + 1  # the job's first batch, the timed calls, the last batch
    assert s.compiled.calls == 1 + inference.TIMED_REPEATS + 2  # compiling, the timed calls, the two full batches
    for x, out in zip(xs, outputs):
        assert torch.equal(out, s.model.inner(x))
    assert s.lines == [f"inference: compiled, 2.00x eager (measured once, cached in {s.cache.path})"]
    decision = s.cache.get(decision_key(s.model, FP32, CPU, (4, 1, 8, 8)))
    assert decision.choice == "compiled" and decision.compile_seconds == pytest.approx(5.0 + 0.04)
    assert decision.eager_seconds_per_image == pytest.approx(0.02)
    assert decision.compiled_seconds_per_image == pytest.approx(0.01)


def test_eager_faster_is_kept(tmp_path):
    s = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.03)
    runner = s.runner(images=10_000)
    for x in batches([4, 4, 4]):
        runner(x)
    assert not runner.compiled and s.compiled.calls == 1 + inference.TIMED_REPEATS  # measured, then not used
    assert s.lines[0].startswith("inference: eager, compiled 0.67x eager (measured once")
    assert s.cache.get(decision_key(s.model, FP32, CPU, (4, 1, 8, 8))).choice == "eager"


def test_a_small_job_runs_eagerly_without_measuring(tmp_path):
    s = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.001)
    runner = s.runner(images=400)  # 8 s eager, less than the 60 s a compile is assumed to cost
    assert 400 * 0.02 < DEFAULT_COMPILE_SECONDS
    for x in batches([4] * 3):
        runner(x)
    assert s.compiles == 0 and s.model.calls == 3 and not s.lines and not s.cache.path.exists()


def test_a_cached_decision_is_used_where_it_pays_back(tmp_path):
    first = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01, compile_seconds=30)
    first.runner(images=10_000)(batches([4])[0])
    measured = first.cache.get(decision_key(first.model, FP32, CPU, (4, 1, 8, 8)))
    # a later job, large enough: compiled straight away, nothing timed again
    again = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)
    runner = again.runner(images=10_000)
    for x in batches([4, 4]):
        runner(x)
    assert runner.compiled and again.model.calls == 0 and again.compiled.calls == 2
    assert again.lines == [f"inference: compiled, 2.00x eager (measured {measured.measured}, cached in "
                           f"{again.cache.path})"]
    # a job too small for the saving (0.01 s an image) to repay the 30 s compile: eager, no compile
    small = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)
    runner = small.runner(images=2_000)
    runner(batches([4])[0])
    assert not runner.compiled and small.compiles == 0 and small.model.calls == 1 and not small.lines
    # the compile measured here is the bar for a job with no decision yet: 100 s eager > 30 s
    other = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)
    other.runner(images=5_000, batch_size=2)(batches([2])[0])
    assert other.compiles == 1 and len(other.cache.records()) == 2


def test_the_key_follows_batch_size_dtype_and_memory_format():
    model = VGG("1x4", in_channels=1, num_classes=3, input_size=8, fc_width=8)
    key = decision_key(model, FP32, CPU, (4, 1, 8, 8))
    assert key == decision_key(model, FP32, CPU, (4, 1, 8, 8))
    assert key["torch"] == torch.__version__ and key["model"] == model.config()
    for other in (decision_key(model, FP32, CPU, (8, 1, 8, 8)), decision_key(model, BF16_NHWC, CPU, (4, 1, 8, 8)),
                  decision_key(model, Speed(None, True, False), CPU, (4, 1, 8, 8)),
                  decision_key(VGG("1x8", in_channels=1, num_classes=3, input_size=8, fc_width=8), FP32, CPU,
                               (4, 1, 8, 8))):
        assert inference.key_id(other) != inference.key_id(key)


def test_a_damaged_cache_file_is_ignored_and_replaced_whole(tmp_path):
    s = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)
    s.cache.path.parent.mkdir(parents=True)
    for damaged in ("{not json", json.dumps({"version": inference.CACHE_VERSION, "decisions": {"x": {"choice": "compiled"}}}),
                    "[]"):
        s.cache.path.write_text(damaged)
        assert s.cache.records() == {}
    runner = s.runner(images=10_000)
    runner(batches([4])[0])
    assert runner.compiled and s.compiles == 1  # measured as if there were no file
    data = json.loads(s.cache.path.read_text())
    assert data["version"] == inference.CACHE_VERSION and len(data["decisions"]) == 1
    assert [p.name for p in s.cache.path.parent.iterdir()] == ["inference.json"]  # no temporary left
    assert len(s.cache.records()) == 1
    s.cache.path.write_text(json.dumps(data | {"version": inference.CACHE_VERSION - 1}))
    assert s.cache.records() == {}  # decided by an older vggkit, whose eager path was another


def test_an_unwritable_cache_is_said_and_the_job_goes_on(tmp_path):
    s = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)
    s.cache = DecisionCache(tmp_path / "a-file" / "inference.json")
    (tmp_path / "a-file").write_text("")
    runner = s.runner(images=10_000)
    runner(batches([4])[0])
    assert runner.compiled and s.lines[0].endswith(f"(measured once, not cached: cannot write {s.cache.path})")


def test_compile_failures_fall_back_to_eager(tmp_path):
    s = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)

    def broken(model, device):
        raise RuntimeError("no C++ compiler found\nand a long traceback")

    s.compiler = broken
    xs = batches([4, 4])
    runner = s.runner(images=10_000, compile="on")
    outputs = [runner(x) for x in xs]
    assert not runner.compiled and all(torch.equal(o, s.model.inner(x)) for o, x in zip(outputs, xs))
    assert s.lines == ["inference: eager, torch.compile failed (RuntimeError: no C++ compiler found); "
                       "the model runs uncompiled"]
    # "auto" records the failure: the next job does not try again
    runner = s.runner(images=10_000)
    runner(xs[0])
    assert not runner.compiled and "torch.compile failed (RuntimeError: no C++ compiler found)" in s.lines[-1]
    decision = s.cache.get(decision_key(s.model, FP32, CPU, (4, 1, 8, 8)))
    assert decision.choice == "eager" and decision.error.startswith("RuntimeError")


def test_off_never_compiles_or_reads_the_cache(tmp_path):
    s = Setup(tmp_path, eager_seconds=0.02, compiled_seconds=0.01)
    s.cache.path.parent.mkdir(parents=True)
    s.cache.path.write_text("{damaged")
    runner = s.runner(images=10**6, compile="off")
    for x in batches([4, 4]):
        runner(x)
    assert s.compiles == 0 and not s.lines and s.cache.path.read_text() == "{damaged"


def test_bad_policy_is_a_one_line_error(tmp_path):
    model = VGG("1x4", in_channels=1, num_classes=3, input_size=8, fc_width=8)
    with pytest.raises(VggkitError, match="compile must be one of auto, on, off, got 'yes'"):
        InferenceRunner(model, FP32, CPU, images=4, batch_size=4, compile="yes")


@pytest.mark.slow
def test_real_compile_gives_eagers_predictions(tmp_path):
    """One real torch.compile of a tiny model (bf16, channels-last, batch norm), last batch smaller."""
    torch.manual_seed(0)
    model = like_trained(VGG("1x4", in_channels=1, num_classes=5, input_size=8, fc_width=8, batch_norm=True),
                         weight_noise=0.3).to(memory_format=torch.channels_last)
    xs = [x.to(memory_format=torch.channels_last) for x in batches([6, 3], seed=1)]
    runner = InferenceRunner(model, BF16_NHWC, CPU, images=9, batch_size=6, compile="on", log=lambda line: None,
                             cache=DecisionCache(tmp_path / "unused.json"))
    compiled = [runner(x) for x in xs]
    if runner.failure:
        pytest.skip(f"torch.compile cannot run here: {runner.failure}")
    assert runner.compiled and runner.compiled_model is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = [model(x) for x in xs]
    for c, e in zip(compiled, eager):
        assert c.shape == e.shape and torch.equal(c.float().argmax(1), e.float().argmax(1))
        assert torch.allclose(c.float(), e.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# evaluate and predict

CLASSES = ["dark", "light"]


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(1)
    model = like_trained(VGG("1x4", in_channels=1, num_classes=len(CLASSES), input_size=8, fc_width=8),
                         weight_noise=0.3)
    meta = {"classes": CLASSES, "mean": [0.5], "std": [0.25], "input_size": 8, "dataset": "drawn",
            "is_sample": False, **preprocess_meta((8, 8))}
    save_checkpoint(tmp_path / "weights", model, meta)
    return tmp_path / "weights"


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 128, (8, 8), dtype=np.uint8) + 100 * c
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    return tmp_path / "images"


class Counting(nn.Module):
    """A stand-in for torch.compile: the model itself, counting the batches it runs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x):
        self.batches.append(len(x))
        return self.model(x)


@pytest.mark.slow
def test_evaluate_runs_full_batches_compiled_and_off_as_before(weights, folder, tmp_path, monkeypatch):
    seen = []

    def counting(model, device):
        seen.append(Counting(model))
        return seen[-1]

    monkeypatch.setattr(inference, "compile_for_inference", counting)
    on = evaluate(weights, data=str(folder), device="cpu", batch_size=4, compile="on", out_dir=tmp_path / "on",
                  log=lambda *a: None)
    assert len(seen) == 1 and seen[0].batches == [4, 4]  # the 2 of the last batch run eagerly
    off = evaluate(weights, data=str(folder), device="cpu", batch_size=4, compile="off", out_dir=tmp_path / "off",
                   log=lambda *a: None)
    assert len(seen) == 1 and off["predictions"] == on["predictions"] and off["loss"] == on["loss"]
    with pytest.raises(VggkitError, match="compile must be one of"):
        evaluate(weights, data=str(folder), device="cpu", compile="yes")


@pytest.mark.slow
def test_evaluate_off_equals_the_training_loops_evaluation(weights, folder, tmp_path):
    from vggkit.checkpoint import load_model
    from vggkit.data.folder import load_labelled_folder

    result = evaluate(weights, data=str(folder), device="cpu", batch_size=3, compile="off", out_dir=tmp_path / "e",
                      log=lambda *a: None)
    model, meta = load_model(weights)
    model = model.to(memory_format=torch.channels_last)
    dataset = load_labelled_folder(folder, CLASSES, False, None, image_size=(8, 8), channels=1)
    loader = BatchLoader(dataset, 3, channels_last=True, out_channels=1, **settings_from_meta(meta))
    loss, acc, predictions = evaluate_loader(model, loader, FP32, CPU, want_predictions=True)
    assert result["predictions"] == predictions.tolist() and result["loss"] == loss and result["acc"] == acc


def test_predict_off_is_the_model_called_as_before(weights, folder, capsys):
    from vggkit.checkpoint import load_model

    paths = image_paths([folder])
    logits, meta = predict_logits(weights, [folder], device="cpu", batch_size=4, compile="off")
    model, _ = load_model(weights)
    with torch.no_grad():
        expected = torch.cat([model(model_inputs(paths[i:i + 4], meta)) for i in range(0, len(paths), 4)])
    assert torch.equal(logits, expected)
    outputs = {}
    for policy in ("off", "auto"):  # a job this small is not worth a compile: the same output
        assert main(["predict", str(weights), str(folder), "--batch-size", "4", "--device", "cpu",
                     "--compile", policy]) == 0
        outputs[policy] = capsys.readouterr()
    assert outputs["off"].out == outputs["auto"].out and len(outputs["off"].out.splitlines()) == 10
    assert outputs["auto"].err == ""


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_cli_bad_compile_value_is_one_line_exit_2(weights, folder, capsys, command):
    argv = [command, str(weights), *([str(folder)] if command == "predict" else ["--data", str(folder)])]
    assert main([*argv, "--compile", "sometimes"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compile" in err and "'auto', 'on', 'off'" in err


# ---------------------------------------------------------------------------------------------
# bench: eager inference, and compiled where asked

def test_bench_times_compiled_inference_where_asked(monkeypatch):
    from vggkit.bench import bench, format_bench

    tiny = dict(preset="fast", arch="1x8", batch_size=16, steps=1, warmup=1, runs=1, peak=False, threads=1)
    plain = bench(**tiny, compile="off")
    assert plain["infer_images_per_s"] > 0 and "infer_compiled_images_per_s" not in plain
    assert "compiled inference" not in format_bench(plain)
    monkeypatch.setattr(torch, "compile", lambda model, **options: model)  # compiling itself is not under test
    r = bench(**tiny, compile="on")
    assert r["infer_images_per_s"] > 0 and r["infer_compiled_images_per_s"] > 0 and r["infer_compile_seconds"] >= 0
    assert r["infer_compiled_speedup"] == pytest.approx(r["infer_compiled_images_per_s"] / r["infer_images_per_s"])
    text = format_bench(r)
    assert "compiled inference images/s" in text and "compiled inference (torch.compile): " in text

    def broken(model, device):
        raise RuntimeError("inductor is unhappy")

    monkeypatch.setattr(inference, "compile_for_inference", broken)
    r = bench(**tiny, compile="on")
    assert "infer_compiled_images_per_s" not in r and r["infer_compile_error"] == "RuntimeError: inductor is unhappy"
    assert "compiled inference not timed: torch.compile failed (RuntimeError: inductor is unhappy)" in format_bench(r)
