import json
import sys

import numpy as np
import pytest
import torch

from vggkit import export
from vggkit.checkpoint import load_model, save_checkpoint
from vggkit.cli import main
from vggkit.errors import VggkitError
from vggkit.export import export_model
from vggkit.model import VGG
from helpers import like_trained

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
META = {"classes": CLASSES, "mean": [0.286], "std": [0.353], "input_size": 28, "dataset": "fashion-mnist"}


def make_run(root, meta=META):
    torch.manual_seed(0)
    model = like_trained(VGG("1x8,1x16", in_channels=1, num_classes=10, input_size=28, fc_width=32, batch_norm=True),
                         weight_noise=0.1)  # "trained": weights and batch-norm statistics away from their init values
    run = root / "run"
    save_checkpoint(run / "checkpoints" / "last", model, meta)
    return run


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path)


def leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def reference(run, x):
    model, _ = load_model(run)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_onnx_parity_dynamic_batch_and_metadata(run):
    result = export_model(run, "onnx")
    assert result["out"] == str(run / "model.onnx")
    assert result["max_abs_diff"] <= 1e-4
    assert result["opset"] == export._opset_range()[1]

    session = ort.InferenceSession(result["out"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch dimension
    for batch in (1, 4, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28), dtype=np.float32)
        np.testing.assert_allclose(session.run(["logits"], {"input": x})[0], reference(run, x), atol=1e-4, rtol=0)

    props = {p.key: p.value for p in onnx.load(result["out"]).metadata_props}
    assert props["arch"] == "1x8,1x16" and props["dataset"] == "fashion-mnist"
    assert json.loads(props["classes"]) == CLASSES
    assert json.loads(props["input_size"]) == [28, 28] and json.loads(props["channels"]) == 1
    assert json.loads(props["mean"]) == [0.286] and json.loads(props["std"]) == [0.353]
    assert leftovers(run) == []


def test_onnx_explicit_opset_and_out(run, tmp_path):
    result = export_model(run / "checkpoints" / "last", "onnx", out=tmp_path / "m13.onnx", opset=13)
    assert result["out"] == str(tmp_path / "m13.onnx")
    assert [o.version for o in onnx.load(result["out"]).opset_import if o.domain in ("", "ai.onnx")] == [13]
    # A directory as --out gets the default file name.
    assert export_model(run, "onnx", out=tmp_path)["out"] == str(tmp_path / "model.onnx")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_parity_and_metadata(run):
    result = export_model(run, "torchscript")
    assert result["out"] == str(run / "model.pt")
    assert result["max_abs_diff"] <= 1e-4 and result["opset"] is None

    extra = {"vggkit.json": ""}
    loaded = torch.jit.load(result["out"], map_location="cpu", _extra_files=extra)
    assert not loaded.training
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28), dtype=np.float32)
        with torch.no_grad():
            got = loaded(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, reference(run, x), atol=1e-4, rtol=0)
    info = json.loads(extra["vggkit.json"])
    assert info["classes"] == CLASSES and info["mean"] == [0.286] and info["std"] == [0.353]
    assert info["input_size"] == [28, 28] and info["channels"] == 1 and info["arch"] == "1x8,1x16"
    assert leftovers(run) == []


def test_missing_meta_fields_get_defaults(tmp_path):
    run = make_run(tmp_path, meta={})
    result = export_model(run, "onnx")
    props = {p.key: p.value for p in onnx.load(result["out"]).metadata_props}
    assert json.loads(props["classes"]) == [str(i) for i in range(10)]
    assert json.loads(props["mean"]) == [0.0] and json.loads(props["std"]) == [1.0]
    assert json.loads(props["input_size"]) == [28, 28]


@pytest.mark.parametrize("fmt, runner", [("onnx", "_run_onnx"), ("torchscript", "_run_torchscript")])
def test_failed_verification_leaves_nothing(run, monkeypatch, fmt, runner):
    real = getattr(export, runner)
    monkeypatch.setattr(export, runner, lambda path, x: real(path, x) + 1e-3)
    with pytest.raises(VggkitError, match="disagrees with PyTorch"):
        export_model(run, fmt)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


@pytest.mark.slow
def test_failed_verification_keeps_previous_file(run, monkeypatch):
    previous = export_model(run, "onnx")["out"]
    before = open(previous, "rb").read()
    monkeypatch.setattr(export, "_run_onnx", lambda path, x: np.full((len(x), 10), np.nan, np.float32))
    with pytest.raises(VggkitError):
        export_model(run, "onnx")
    assert open(previous, "rb").read() == before and leftovers(run) == []


def test_missing_onnxruntime(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(VggkitError, match=r"pip install 'vggkit\[export\]'"):
        export_model(run, "onnx")


def test_unsupported_opset_names_the_range(run):
    low, high = export._opset_range()
    with pytest.raises(VggkitError, match=f"from {low} to {high}"):
        export_model(run, "onnx", opset=high + 1)


def test_cli_export_succeeds(run, capsys):
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert "model.pt" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no-weights", "format", "opset", "out-dir", "opset-torchscript"])
def test_cli_bad_input_is_one_line_exit_2(run, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    args = {
        "no-weights": [str(tmp_path / "empty"), "--format", "onnx"],
        "format": [str(run), "--format", "tflite"],
        "opset": [str(run), "--format", "onnx", "--opset", "99"],
        "out-dir": [str(run), "--format", "onnx", "--out", str(tmp_path / "missing" / "m.onnx")],
        "opset-torchscript": [str(run), "--format", "torchscript", "--opset", "13"],
    }[case]
    assert main(["export", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vggkit: error: ") and captured.err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_interpolation_in_metadata(tmp_path):
    from vggkit.preprocess import preprocess_meta

    run = make_run(tmp_path, meta=META | preprocess_meta())
    props = {p.key: p.value for p in onnx.load(export_model(run, "onnx")["out"]).metadata_props}
    assert (props["interpolation"], props["antialias"], props["align_corners"]) == ("bilinear", "when shrinking", "false")
    older = make_run(tmp_path / "older", meta=META)  # written before the interpolation was recorded: the same,
    info = export.preprocessing(*load_model(older))  # and no fit of other-sized images ("plain", preprocess.py)
    assert {k: info[k] for k in preprocess_meta()} == preprocess_meta() | {"resize": "plain"}
    with pytest.raises(VggkitError, match="resize this vggkit does not know"):
        export_model(make_run(tmp_path / "odd", meta=META | {"interpolation": "nearest"}), "onnx")
