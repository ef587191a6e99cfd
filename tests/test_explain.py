"""`vggkit explain`: Grad-CAM that finds a class's evidence (a model trained to see a bright patch in one
corner looks at that corner), equals Grad-CAM computed by hand on the plain network, maps back through
the fit and the photo models' centre crop, and the CLI's PNGs and one-line errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_rgb_weights

from vggkit.cli import main
from vggkit.errors import VggkitError
from vggkit.explain import Explainer, explain, overlay, write_pngs
from vggkit.features import FeatureExtractor
from vggkit.model import VGG, set_kernels
from vggkit.predict import predict
from vggkit.preprocess import CENTER, preprocess_meta
from vggkit.train import train

CORNERS = ["a-top-left", "b-top-right", "c-bottom-left", "d-bottom-right"]  # sorted: class index = corner
SIDE, PATCH = 32, 8
CLASSES = ["ant", "bee", "cat"]


def corner_image(corner: int, rng) -> np.ndarray:
    """Dark noise with a bright square near one corner (jittered by up to 3 pixels)."""
    image = rng.integers(0, 60, (SIDE, SIDE, 3), dtype=np.uint8)
    dy, dx = rng.integers(0, 4, 2)
    y = dy if corner in (0, 1) else SIDE - PATCH - dy
    x = dx if corner in (0, 2) else SIDE - PATCH - dx
    image[y:y + PATCH, x:x + PATCH] = 230
    return image


@pytest.fixture(scope="module")
def corner_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corners")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CORNERS):
        (root / "data" / name).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(corner_image(c, rng)).save(root / "data" / name / f"{i}.png")
    history = train({"data": str(root / "data"), "arch": "1x8,1x16,1x32", "input_size": SIDE, "fc_width": 32,
                     "epochs": 8, "batch_size": 8, "lr": 0.05, "label_smoothing": 0.0, "weight_decay": 0.0,
                     "precision": "fp32", "device": "cpu", "flip": False, "crop_padding": 0, "threads": 1,
                     "out": str(root), "name": "run", "seed": 0}, progress="none", log=lambda *a: None)
    return history.run_dir


@pytest.fixture
def weights(tmp_path):
    """Random weights of a 2-block network for 3 classes, stored at 12 x 12."""
    return random_rgb_weights(tmp_path / "weights", CLASSES, 12, batch_norm=True)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(12, 12), (20, 30), (40, 16)]):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.slow
def test_heatmap_peaks_in_the_corner_that_makes_the_class(corner_run, tmp_path):
    explainer = Explainer.from_run(corner_run)
    for corner, name in enumerate(CORNERS):
        path = tmp_path / f"{name}.png"
        Image.fromarray(corner_image(corner, np.random.default_rng(100 + corner))).save(path)
        found = explainer.explain([path])[0]
        assert found.target == name and found.probability == max(t["probability"] for t in found.top)
        heat = found.heatmap
        assert heat.shape == (SIDE, SIDE) and heat.max() == pytest.approx(1.0)
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        assert (y < SIDE // 2) == (corner in (0, 1)) and (x < SIDE // 2) == (corner in (0, 2)), (name, y, x)


def test_grad_cam_is_the_plain_networks_by_hand_and_predict_agrees(weights, images):
    found = explain(weights, images[:1])[0]
    fresh = Explainer.from_run(weights)
    model = fresh.model
    x = fresh.preprocess(torch.from_numpy(found.pixels).permute(2, 0, 1)[None].contiguous())
    set_kernels(model, "plain")
    activations = FeatureExtractor(model, ["block2"])(x)["block2"]
    logits = model.forward_head(activations)
    gradient, = torch.autograd.grad(logits[0, found.index], activations)
    by_hand = (gradient.mean((2, 3), keepdim=True) * activations).sum(1)[0].clamp(min=0).detach()
    assert found.index == int(logits.argmax())
    upsampled = torch.nn.functional.interpolate(by_hand[None, None], size=(12, 12), mode="bilinear")[0, 0]
    np.testing.assert_allclose(found.heatmap, (upsampled / upsampled.max()).numpy(), atol=1e-5)
    predicted = predict(weights, images[:1], top_k=3, compile="off")[0]["top"]
    assert [t["class"] for t in predicted] == [t["class"] for t in found.top]
    np.testing.assert_allclose([t["probability"] for t in predicted], [t["probability"] for t in found.top], atol=1e-5)


def test_kernels_mode_is_put_back_and_the_answer_is_the_same_in_every_mode(weights, images):
    explainer = Explainer.from_run(weights)
    heatmaps = []
    for mode in ("reordered", "fused", "plain"):
        set_kernels(explainer.model, mode)
        kept = {m: m.kernels for m in explainer.model.modules() if hasattr(m, "kernels")}
        heatmaps.append(explainer.explain(images[1:2])[0].heatmap)
        assert {m: m.kernels for m in explainer.model.modules() if hasattr(m, "kernels")} == kept
    np.testing.assert_array_equal(heatmaps[0], heatmaps[1])
    np.testing.assert_array_equal(heatmaps[0], heatmaps[2])


def test_heatmap_covers_the_region_the_network_saw(weights, images):
    explainer = Explainer.from_run(weights)
    wide, tall = explainer.explain(images[1:])  # 20 x 30 and 40 x 16, fitted to 12 x 12 by a centre crop
    assert wide.heatmap.shape == (20, 30) and wide.region == (5, 0, 25, 20)
    assert tall.heatmap.shape == (40, 16) and tall.region == (0, 12, 16, 28)
    for found in (wide, tall):
        left, top, right, bottom = found.region
        outside = found.heatmap.copy()
        outside[top:bottom, left:right] = 0
        assert not outside.any() and found.heatmap.max() == pytest.approx(1.0)
    assert overlay(wide).size == (30, 20) and overlay(wide, min_side=100).size == (150, 100)


def test_photo_models_centre_crop_is_mapped_back(images):
    torch.manual_seed(0)
    model = VGG("1x4", in_channels=3, num_classes=2, input_size=8, fc_width=8).eval()
    meta = {"classes": ["x", "y"], "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 8, "model": model.config(),
            **preprocess_meta((16, 16), crop=CENTER)}
    explainer = Explainer(model, meta)
    # 40 x 16 -> the centre 16 x 16 (rows 12..28) stored at 16 x 16 -> its centre 8 x 8: rows 16..24, cols 4..12
    assert explainer.seen_region((40, 16)) == (4, 16, 12, 24)
    found = explainer.explain(images[2:3])[0]
    assert found.region == (4, 16, 12, 24) and found.heatmap[:16].max() == 0 and found.heatmap[24:].max() == 0


def test_photo_models_jpegs_are_shown_at_their_own_size(tmp_path):
    """The network reads a photo model's JPEG decoded reduced, as its prepared cache did; the heatmap lies over
    the image at its own size."""
    torch.manual_seed(0)
    model = VGG("1x4", in_channels=3, num_classes=2, input_size=8, fc_width=8).eval()
    meta = {"classes": ["x", "y"], "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 8, "model": model.config(),
            **preprocess_meta((16, 16), crop=CENTER)}
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(photo)
    explainer = Explainer(model, meta)
    found = explainer.explain([photo])[0]
    assert found.pixels.shape == (120, 200, 3) and found.heatmap.shape == (120, 200)
    assert found.region == explainer.seen_region((120, 200))
    with open(photo, "rb") as upload:
        assert explainer.explain([upload])[0].pixels.shape == (120, 200, 3)


def test_given_class_and_layer(weights, images):
    explainer = Explainer.from_run(weights, layer="block1")
    found = explainer.explain(images[:1], target="cat")[0]
    assert (found.target, found.index, found.layer) == ("cat", 2, "block1")
    assert explainer.explain(images[:1], target=1)[0].target == "bee"
    assert Explainer.from_run(weights, layer="block2.conv1").explain(images[:1])[0].heatmap.shape == (12, 12)


def test_cli_writes_titled_pngs(weights, images, tmp_path, capsys):
    out = tmp_path / "cams"
    assert main(["explain", str(weights), *map(str, images), "--out", str(out)]) == 0
    written = sorted(out.glob("*.png"))
    assert [p.name for p in written] == ["im0.gradcam.png", "im1.gradcam.png", "im2.gradcam.png"]
    with Image.open(out / "im1.gradcam.png") as png:  # 20 x 30 enlarged x13 to a side of 256 or more, plus the title
        assert png.size[0] == 30 * 13 and png.size[1] > 20 * 13
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{images[0]}: ") and "%" in lines[0] and "im0.gradcam.png" in lines[0]


def test_repeated_names_are_numbered(weights, images, tmp_path):
    found = explain(weights, [images[0], images[0]])
    assert [p.name for p in write_pngs(found, tmp_path / "o")] == ["im0.gradcam.png", "im0-2.gradcam.png"]


@pytest.mark.parametrize("case, needle", [
    ("not-an-image", "is not a readable image"),
    ("missing-image", "does not exist"),
    ("missing-run", "no-run"),
    ("bad-class", "unknown class 'zebra'"),
    ("bad-layer", "unknown layer 'block9'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(weights, images, tmp_path, capsys, case, needle):
    (tmp_path / "notes.txt").write_text("not an image")
    run, image, extra = str(weights), str(images[0]), []
    if case == "not-an-image":
        image = str(tmp_path / "notes.txt")
    elif case == "missing-image":
        image = str(tmp_path / "gone.png")
    elif case == "missing-run":
        run = str(tmp_path / "no-run")
    elif case == "bad-class":
        extra = ["--class", "zebra"]
    else:
        extra = ["--layer", "block9"]
    out = tmp_path / "cams"
    assert main(["explain", run, image, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_pixels_in_memory_and_uploads(weights, images):
    import io

    explainer = Explainer.from_run(weights)
    upload = io.BytesIO(images[0].read_bytes())
    upload.name = "upload.png"
    from_file, from_upload = explainer.explain([images[0], upload])
    from_pixels = explainer.explain([np.asarray(Image.open(images[0]))])[0]
    assert from_upload.image == "upload.png"
    np.testing.assert_array_equal(from_file.heatmap, from_upload.heatmap)
    np.testing.assert_array_equal(from_file.heatmap, from_pixels.heatmap)
    bad = io.BytesIO(b"not an image")
    bad.name = "notes.txt"
    with pytest.raises(VggkitError, match="notes.txt is not a readable image"):
        explainer.explain([bad])


def test_evaluate_writes_a_grad_cam_grid_beside_the_misclassified_grid(weights, tmp_path):
    from vggkit.evaluate import evaluate

    rng = np.random.default_rng(0)
    for name in CLASSES:
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "folder" / name / f"{i}.png")
    result = evaluate(weights, data=str(tmp_path / "folder"), out_dir=tmp_path / "ev", compile="off", log=lambda *a: None)
    assert result["misclassified"]  # random weights: most are wrong
    with Image.open(tmp_path / "ev" / "misclassified_gradcam.png") as grid, \
            Image.open(tmp_path / "ev" / "misclassified.png") as plain:
        assert grid.size == plain.size
