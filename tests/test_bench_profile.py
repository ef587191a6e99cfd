"""`vggkit bench --profile`: a training step's self time by group of ops. No timing asserts: only
that every op lands in one group, the groups add up to the total, and the CLI prints the table."""
import json
from types import SimpleNamespace

import pytest
import torch

from vggkit.bench import format_profile, profile
from vggkit.bench.profile import GROUPS, group_of, group_times
from vggkit.cli import main

TINY = dict(preset="fast", arch="1x8,1x16", batch_size=16, steps=2, warmup=1)


def event(name, parent=None, self_us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=self_us)


def test_ops_are_grouped_by_themselves_or_what_encloses_them():
    step = event("Optimizer.step#SGD.step")
    pool_backward = event("aten::max_pool2d_with_indices_backward")
    data = event("vggkit.data")
    cases = {
        "convolution": [event("aten::mkldnn_convolution"),
                        event("autograd::engine::evaluate_function: ConvolutionBackward0"),
                        event("vggkit::conv3x3_weight_grad")],
        "pooling": [event("aten::fill_", pool_backward), event("vggkit::max_pool_relu"), event("MaxPoolReLUBackward")],
        "activations": [event("aten::clamp_min", event("aten::relu")), event("aten::threshold_backward")],
        "normalization": [event("aten::native_batch_norm"), event("NativeBatchNormBackward0")],
        "optimizer": [event("aten::_foreach_add_", step), event("aten::mul_", event("aten::add", step))],
        "data": [event("aten::upsample_bilinear2d", data), event("aten::relu", data)],
        "other": [event("aten::addmm"), event("aten::copy_", event("aten::to"))],
    }
    for group, events in cases.items():
        assert [group_of(e) for e in events] == [group] * len(events), group
    totals = group_times([event("aten::conv2d", self_us=3e3), event("aten::addmm", self_us=1e3)])
    assert list(totals) == list(GROUPS) and totals["convolution"] == 3e-3 and totals["other"] == 1e-3


@pytest.mark.slow
def test_profile_splits_a_real_step():
    r = profile(**TINY)
    assert list(r["groups"]) == list(GROUPS) and r["steps"] == 2
    assert sum(r["groups"].values()) == pytest.approx(r["total_ms_per_step"])
    assert r["groups"]["convolution"] > 0 and r["groups"]["optimizer"] > 0 and r["groups"]["data"] > 0
    assert 0 < r["total_ms_per_step"] <= r["wall_ms_per_step"] * 1.5
    text = format_profile(r)
    assert all(name in text for name in GROUPS) and "ms/step" in text and "total" in text


@pytest.mark.slow
def test_cli_prints_the_table(capsys):
    argv = ["bench", "--profile", "--preset", "fast", "--arch", "1x8", "--batch-size", "8", "--steps", "1",
            "--warmup", "1", "--kernels", "plain"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cells = [line.split() for line in out.splitlines()]
    ms = {row[0]: float(row[1]) for row in cells if row and row[0] in (*GROUPS, "total")}
    assert set(ms) == {*GROUPS, "total"}
    assert sum(ms[name] for name in GROUPS) == pytest.approx(ms["total"], abs=0.5)  # rounded to 0.1 each
    assert "kernels plain" in out
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernels"] == "plain"


def test_the_textbook_loop_keeps_the_plain_network():
    import numpy as np

    from vggkit.bench.textbook import TextbookSteps
    from vggkit.config import resolve_config
    from vggkit.data import Dataset

    images, labels = np.zeros((4, 28, 28, 1), dtype=np.uint8), np.arange(4) % 2
    config = resolve_config(overrides={"arch": "1x4", "batch_size": 2, "input_size": 28, "kernels": "fast"})
    textbook = TextbookSteps(config, torch.device("cpu"), Dataset(images, labels, ["a", "b"]), seed=0)
    assert [block.kernels for block in textbook.model.features] == ["plain"]
    assert textbook.train_step() == 2
