"""Export a trained model to ONNX or TorchScript, verified against PyTorch before it is kept.

The file is written beside its final name, loaded back in its own runtime (onnxruntime or
torch.jit) and run on two batch sizes; only if every logit is within ATOL of the PyTorch model
is it renamed into place. A failed export leaves nothing behind.

Default output: `<run>/model.onnx` or `<run>/model.pt`, where `<run>` is the run directory that
holds `checkpoints/` (not the checkpoint directory itself: save_checkpoint replaces that whole
directory on the next save). A checkpoint directory outside a run gets the file next to its weights.

Both files carry the preprocessing (preprocess.py): pixels scaled to [0, 1], then (x - mean) / std
per channel, resized to `input_size` (height, width) with `interpolation` ("bilinear",
align_corners false, antialiased when shrinking), and the class names in output order.
ONNX: `metadata_props` (strings as they are, other values as JSON). TorchScript: the extra file
`vggkit.json` (read it with torch.jit.load(path, _extra_files={"vggkit.json": ""})). Both also say
which weights were exported ("weights": "ema", a run's averaged weights, the default when it has
some; or "raw").
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .checkpoint import load_model
from .errors import VggkitError
from .preprocess import interpolation_of
from .rundir import EXPORTS, export_dir

FORMATS = EXPORTS  # the file name of each format (rundir: a run's own files)
ATOL = 1e-4
BATCH_SIZES = (3, 1)  # two sizes: proves the batch dimension is really dynamic
INSTALL_HINT = "install the export extra: pip install 'vggkit[export]'"


def export_model(path, fmt: str = "onnx", out=None, opset: int | None = None, averaged: bool = True) -> dict:
    """Export the model stored at `path` (run dir, checkpoint dir or model.safetensors): its
    averaged weights (--ema) when it has some, unless `averaged` is False.

    Returns {"out": str, "format": str, "max_abs_diff": float, "opset": int | None, "weights": "ema" | "raw"}.
    """
    if fmt not in FORMATS:
        raise VggkitError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        opset = _check_opset(opset)
        _require_onnx()
    elif opset is not None:
        raise VggkitError("--opset applies to ONNX only; drop it or use --format onnx")

    model, meta = load_model(path, averaged=averaged)
    model = model.float().eval()
    target = _target(path, fmt, out)
    info = preprocessing(model, meta) | {"weights": meta["weights"]}
    result = {"out": str(target), "format": fmt, "opset": opset, "weights": meta["weights"]}

    def write(tmp: str) -> None:
        if fmt == "onnx":
            _write_onnx(model, info, tmp, opset)
            run = _run_onnx
        else:
            _write_torchscript(model, info, tmp)
            run = _run_torchscript
        result["max_abs_diff"] = _verify(model, tmp, run)

    atomic_write(target, write)  # a link, a device or a FIFO at target is refused; errors.py says the rest
    return result


def preprocessing(model, meta: dict) -> dict:
    """What a caller must do to an image before the network, with defaults for missing fields."""
    channels = model.in_channels
    return {
        "arch": model.config()["arch"],
        "input_size": list(model.input_size),
        "channels": channels,
        "mean": list(meta.get("mean", [0.0] * channels)),
        "std": list(meta.get("std", [1.0] * channels)),
        "classes": list(meta.get("classes", [str(i) for i in range(model.num_classes)])),
        "dataset": meta.get("dataset", ""),
        "batch_norm": model.batch_norm,
        **interpolation_of(meta),
    }


def _target(path, fmt: str, out) -> Path:
    if out is None:
        return export_dir(path) / FORMATS[fmt]
    target = Path(out)
    if target.is_dir():
        return target / FORMATS[fmt]
    if not target.parent.is_dir():
        raise VggkitError(f"directory {target.parent} does not exist; create it or choose another --out")
    return target


def _opset_range() -> tuple[int, int]:
    try:
        from torch.onnx import _constants as c

        return c.ONNX_MIN_OPSET, c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):
        return 7, 20


def _check_opset(opset) -> int:
    low, high = _opset_range()
    if opset is None:
        return high
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise VggkitError(f"ONNX opset {opset!r} is not supported by this exporter; use an opset from {low} to {high}")
    return opset


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise VggkitError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing); {INSTALL_HINT}") from None


def _write_onnx(model, info: dict, path: str, opset: int) -> None:
    import onnx

    example = torch.zeros(1, info["channels"], *info["input_size"])
    # The TorchScript-based exporter (dynamo=False): it needs no onnxscript and honours every
    # opset in its range; the dynamo exporter needs onnxscript and emits opset >= 18 whatever is asked.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), path, dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(path)
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.doc_string = "vggkit VGG classifier; preprocessing in metadata_props"
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _write_torchscript(model, info: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but asked for
        torch.jit.save(torch.jit.script(model), path, _extra_files={"vggkit.json": json.dumps(info)})


def _run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _run_torchscript(path: str, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(path, map_location="cpu").eval()
    with torch.no_grad():
        return loaded(torch.from_numpy(x)).numpy()


def _verify(model, path: str, run) -> float:
    """Largest |logit difference| between the exported file in its runtime and `model`."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in BATCH_SIZES:
        x = torch.randn(batch, model.in_channels, *model.input_size, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        try:
            got = run(path, x.numpy())
        except Exception as e:  # any runtime failure means the export is unusable
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise VggkitError(f"the exported file fails to run in its runtime ({first}); nothing was written") from None
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        if not diff <= ATOL:  # also catches NaN
            raise VggkitError(
                f"the exported model disagrees with PyTorch (max |logit difference| {diff:.3g} > {ATOL:g} "
                f"at batch size {batch}); nothing was written"
            )
        worst = max(worst, diff)
    return worst
