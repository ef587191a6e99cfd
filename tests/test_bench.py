"""`vggkit bench` on a tiny network and a few steps: it runs, prints its fields, --json has the
keys, --compare adds the textbook loop; bad input is one line and exit code 2. No timing asserts."""
import dataclasses
import json

import pytest
import torch

from vggkit.bench import BenchSettings, bench
from vggkit.bench import format_bench
from vggkit.bench.peak import probe_precision
from vggkit.cli import main
from vggkit.errors import VggkitError
from vggkit.bench.machine import cpu_snapshot, others_cpu, timed
from vggkit.runtime import PRECISIONS

TINY = ["--preset", "fast", "--arch", "1x8,1x16", "--batch-size", "16", "--steps", "1", "--warmup-steps", "1", "--runs", "1"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_bench_prints_the_fields(capsys):
    code, out, err = run_cli(capsys, "bench", *TINY)
    assert code == 0, err
    for needle in ("train images/s", "train FLOP/s", "train fraction of peak", "inference images/s",
                   "measured peak", "3 x 2 x forward MACs", "median of 1 run", "1x8,1x16", "batch 16"):
        assert needle in out, needle
    assert "textbook" not in out


@pytest.mark.slow
def test_bench_json_has_the_keys(capsys):
    code, out, _ = run_cli(capsys, "bench", *TINY, "--json", "--precision", "fp32", "--channels-last", "off")
    assert code == 0
    r = json.loads(out)
    for key in ("train_images_per_s", "infer_images_per_s", "train_flops_per_s", "train_flops_per_image",
                "macs_per_image", "peak", "train_fraction_of_peak", "settings", "device", "threads", "steps",
                "allocator", "load_average"):
        assert key in r, key
    assert r["train_flops_per_image"] == 6 * r["macs_per_image"]
    assert r["precision"] == "fp32" and r["channels_last"] is False
    assert r["train_images_per_s"] > 0 and r["peak"]["flops_per_s"] > 0
    assert r["input_shape"] == [1, 28, 28] and r["batch_size"] == 16
    assert "baseline" not in r
    precision = probe_precision(torch.device(r["device"]))
    assert precision in PRECISIONS and set(r["peak"]["probes"]) == {f"conv_{precision}", f"matmul_{precision}"}


@pytest.mark.slow
def test_bench_compare_adds_the_textbook_loop(capsys):
    code, out, _ = run_cli(capsys, "bench", *TINY, "--compare", "--input-size", "32", "--no-peak", "--json")
    assert code == 0
    r = json.loads(out)
    base = r["baseline"]
    assert base["train_images_per_s"] > 0 and base["infer_images_per_s"] > 0
    assert "fp32, NCHW" in base["settings"] and "per-sample PIL resize" in base["settings"]
    assert r["speedup"] == pytest.approx(r["train_images_per_s"] / base["train_images_per_s"])
    assert len(r["speedup_runs"]) == 1 and "peak" not in r
    assert "random uint8 28x28, resized to 32" in r["data"]
    text = format_bench(r)
    assert "textbook" in text and "training speed-up" in text and "ratio" in text


@pytest.mark.slow
def test_bench_api_on_real_images(fmnist_dir):
    r = bench(preset="fast", arch="1x8", batch_size=32, steps=1, warmup=1, runs=1, data="fashion-mnist",
              data_dir=str(fmnist_dir), peak=False, inference=False, allocator="default", compare=True)
    assert r["data"].startswith("fashion-mnist train split") and r["allocator"] == "default"
    assert r["train_images_per_s"] > 0 and "infer_images_per_s" not in r and r["baseline"]["train_images_per_s"] > 0


@pytest.mark.slow
def test_a_settings_object_and_keywords_are_the_same_call():
    settings = BenchSettings(preset="fast", arch="1x8", batch_size=16, steps=1, warmup=1, runs=1, peak=False,
                             inference=False, precision="fp32", channels_last="off")
    by_object, by_keywords = bench(settings), bench(**dataclasses.asdict(settings))
    same = ("arch", "batch_size", "steps", "warmup", "runs", "settings", "macs_per_image", "data", "allocator")
    assert {k: by_object[k] for k in same} == {k: by_keywords[k] for k in same}
    assert by_object["arch"] == "1x8" and by_object["settings"] == "fp32" and "infer_steps" not in by_object
    changed = bench(settings, runs=2)
    assert changed["runs"] == 2 and len(changed["train_images_per_s_runs"]) == 2 and settings.runs == 1


def test_default_warmup_and_checked_settings():
    assert BenchSettings().warmup is None and BenchSettings().preset == "fast"  # train's default recipe
    with pytest.raises(VggkitError, match="runs must be a positive integer, got 0"):
        bench(runs=0)
    with pytest.raises(VggkitError, match="unknown preset 'vgg16'; choose one of fast, d2l, best"):
        bench(preset="vgg16")
    with pytest.raises(TypeError):
        bench(no_such_setting=1)


def test_machine_clock_and_load():
    calls = []
    assert timed(lambda: calls.append(1), 3, torch.device("cpu")) >= 0 and len(calls) == 3
    assert others_cpu(None) is None
    busy = others_cpu(cpu_snapshot())
    assert busy is None or busy >= 0


@pytest.mark.parametrize("argv,needle", [
    (["--batch-size", "0"], "positive integer"),
    (["--arch", "1x8,zz"], "cannot read block"),
    (["--precision", "fp99"], "invalid choice"),
    (["--steps", "-1"], "positive integer"),
    (["--device", "tpu"], "unknown device"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--input-size", "1"], "too small"),
])
def test_bench_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = run_cli(capsys, "bench", *TINY, "--no-peak", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vggkit: error:") and needle in err, err


@pytest.mark.slow
def test_memory_estimate_within_20_percent_of_measured(tmp_path):
    """benchmarks/bench_memory.py in a fresh process: VGG-11/4 at 224, batch 32, bf16, channels-last;
    with every block of 64 KiB or more mapped on its own, the peak RSS follows the live tensors."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_memory.py"
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(script), "--configs", "d2l-32", "--allocators", "exact", "--steps", "2",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)
    (r,) = json.loads(out.read_text())
    assert r["config"] == "d2l-32" and r["dtype"] == "bfloat16"
    assert abs(r["error"]) < 0.2, r
