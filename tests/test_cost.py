import json

import pytest
import torch

from vggkit import VGG
from vggkit.cli import main
from vggkit.cost import summary


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_textbook_shapes_in_report(capsys):
    code, out, _ = run_cli(capsys, "summary", "--arch", "vgg11", "--in-channels", "1", "--input-size", "224", "--json")
    assert code == 0
    report = json.loads(out)
    shapes = [tuple(r["output_shape"]) for r in report["rows"]]
    assert shapes == [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7),
                      (25088,), (4096,), (4096,), (10,)]
    assert report["totals"]["params"] == sum(r["params"] for r in report["rows"])


def test_vgg16_macs_match_published_figure():
    with torch.device("meta"):
        model = VGG("vgg16", num_classes=1000)
    report = summary(model)
    assert report.params == 138_357_544
    assert report.macs == pytest.approx(15.5e9, rel=0.01)


def test_per_layer_rows_sum_to_block_rows():
    model = VGG("2x8,1x16", in_channels=1, input_size=28, fc_width=32, batch_norm=True)
    report = summary(model, batch_size=8)
    per_layer, per_block = report.to_dict(per_layer=True), report.to_dict()
    assert [r["kind"] for r in per_layer["rows"][:7]] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d"]
    assert sum(r["macs"] for r in per_layer["rows"]) == sum(r["macs"] for r in per_block["rows"])
    assert sum(r["activation_bytes"] for r in per_layer["rows"]) == sum(r["activation_bytes"] for r in per_block["rows"])
    # first conv: 8 outputs of 28x28, each 1*3*3 MACs
    assert per_layer["rows"][0]["macs"] == 8 * 28 * 28 * 9


def test_training_memory_counts_optimizer_state_and_scales_with_batch():
    model = VGG("1x8", in_channels=1, input_size=8, fc_width=16)
    sgd, adam = summary(model, optimizer="sgd").memory(), summary(model, optimizer="adam").memory()
    assert sgd["optimizer_state"] == 0 and adam["optimizer_state"] == 2 * adam["weights"]
    small, big = summary(model, batch_size=1).memory(), summary(model, batch_size=10).memory()
    assert big["activations"] == 10 * small["activations"] and big["weights"] == small["weights"]
    assert summary(model, dtype="bfloat16").memory()["activations"] < small["activations"]


def test_report_table_is_readable(capsys):
    code, out, _ = run_cli(capsys, "summary", "--arch", "d2l-vgg11", "--ratio", "4", "--batch-size", "128")
    assert code == 0
    assert "block5" in out and "16x112x112" in out and "training step, batch 128" in out


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "1x64,zz"], "cannot read block"),
    (["--arch", "vgg11", "--ratio", "0"], "positive integer"),
    (["--arch", "vgg11", "--ratio", "-2"], "positive integer"),
    (["--arch", "vgg11", "--ratio", "1000"], "empties block"),
    (["--arch", "vgg11", "--input-size", "16"], "too small"),
    (["--arch", "vgg11", "--batch-size", "0"], "positive integer"),
    (["--arch", "vgg11", "--num-classes", "-1"], "positive integer"),
    (["--arch", "0x64"], "must be positive"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = run_cli(capsys, "summary", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vggkit: error:") and needle in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_console_script_exit_code(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "vggkit", "summary", "--arch", "1x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
