"""The guide's onnxruntime snippet (docs/guide.md), run as written, agrees with `vggkit predict` on images of
every kind: gray and RGB, smaller, larger and the size of the input, square or not; for models that
fit images to their training images' size (centre crop) and for models from before (plain resize)."""
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.checkpoint import read_meta, save_checkpoint
from vggkit.export import export_model
from vggkit.model import VGG
from vggkit.predict import model_inputs, predict
from vggkit.preprocess import preprocess_meta

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
MODEL, IMAGE = "runs/my-run/model.onnx", "shoe.png"  # the snippet's placeholders
CLASSES = ["ant", "bee", "cat", "dog", "eel"]
INPUT_SIZE = 24
# (height, width, mode): smaller, the same, larger and mixed against INPUT_SIZE
IMAGES = [(8, 8, "L"), (24, 24, "RGB"), (60, 60, "RGB"), (40, 17, "L"), (13, 90, "RGB"), (31, 24, "L")]


def guide_snippet() -> str:
    export_section = GUIDE.read_text().split("## ONNX and TorchScript", 1)[1]
    code = re.search(r"```python\n(.*?)```", export_section, re.S).group(1)
    assert MODEL in code and IMAGE in code
    return code


def exported_model(root: Path, channels: int, preprocess: dict) -> Path:
    torch.manual_seed(5 + channels)  # a seed whose model tells these images apart
    model = VGG("1x8,1x16", in_channels=channels, num_classes=len(CLASSES), input_size=INPUT_SIZE, fc_width=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    meta = {"classes": CLASSES, "mean": [0.4, 0.5, 0.6][:channels], "std": [0.2, 0.25, 0.3][:channels],
            "input_size": INPUT_SIZE, "dataset": "drawn", "is_sample": False, **preprocess}
    run = root / "run"
    save_checkpoint(run / "checkpoints" / "last", model, meta)
    export_model(run, "onnx")
    return run


def drawn_images(root: Path) -> list[Path]:
    """Smooth shapes plus noise, so that a resize has something to get right."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w, mode) in enumerate(IMAGES):
        yy, xx = np.mgrid[0:h, 0:w]
        channels = [np.sin(xx / (2 + i + c) + yy / (3 + c)) * 60 + 50 + 30 * i + rng.normal(0, 30, (h, w))
                    for c in range(1 if mode == "L" else 3)]
        pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
        path = root / f"{i}-{w}x{h}-{mode}.png"
        Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)
        paths.append(path)
    return paths


def run_snippet(code: str, model: Path, image: Path) -> tuple[str, dict]:
    """(what the snippet prints, its variables) for one image."""
    namespace, out = {}, io.StringIO()
    code = code.replace(MODEL, str(model)).replace(IMAGE, str(image))
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/guide.md (ONNX)", "exec"), namespace)
    return out.getvalue().strip(), namespace


@pytest.mark.parametrize("preprocess", [preprocess_meta((20, 16)), preprocess_meta(), {},
                                        preprocess_meta((28, 28), "center")],
                         ids=["fit-to-20x16", "fit-to-input", "plain", "photos"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_onnx_snippet_matches_predict(tmp_path, channels, preprocess):
    run = exported_model(tmp_path, channels, preprocess)
    images = drawn_images(tmp_path)
    if preprocess.get("crop"):  # a photo model reads JPEGs at reduced scale: one large enough to be reduced
        Image.open(images[2]).convert("RGB").resize((200, 150)).save(tmp_path / "large.jpg", quality=90)
        images.append(tmp_path / "large.jpg")
    code = guide_snippet()
    predicted = predict(run, images, top_k=1, device="cpu")
    meta = read_meta(run)
    for image, result in zip(images, predicted, strict=True):
        printed, variables = run_snippet(code, run / "model.onnx", image)
        assert printed == result["top"][0]["class"], image.name
        # the very input vggkit gives the network, not merely the same winner
        expected = model_inputs([image], meta).numpy()
        assert variables["x"][None].shape == expected.shape
        np.testing.assert_allclose(variables["x"][None], expected, atol=1e-5, rtol=0, err_msg=image.name)
    assert len({r["top"][0]["class"] for r in predicted}) > 1  # the images do not all look alike to the model
