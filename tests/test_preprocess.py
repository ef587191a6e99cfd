"""One preprocessing for training, evaluation and predict: the resize rule, the metadata, and
predict giving the training pipeline's logits on an image folder."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vggkit.checkpoint import load_model, read_meta, save_checkpoint
from vggkit.data import load_data
from vggkit.errors import VggkitError
from vggkit.model import VGG
from vggkit.pipeline import BatchLoader
from vggkit.data import Dataset
from vggkit.predict import model_inputs, predict, predict_logits
from vggkit.preprocess import Preprocess, fit_size, interpolation_of, preprocess_meta, resize, settings_from_meta
from helpers import like_trained


def uint8_images(n, channels, h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, channels, h, w), dtype=np.uint8))


@pytest.mark.parametrize("h, w, antialias", [(7, 12, False), (16, 8, False), (40, 40, True), (9, 30, True)])
def test_resize_antialiases_only_when_shrinking(h, w, antialias):
    x = torch.randn(2, 3, h, w)
    expected = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=antialias)
    assert torch.equal(resize(x, (16, 16)), expected)
    assert resize(x, (h, w)) is x  # the input size already: untouched


def test_resize_shrinking_averages_instead_of_aliasing():
    """Why antialias: shrinking one-pixel stripes 3x, plain bilinear picks single pixels (0 or 1)."""
    x = torch.zeros(1, 1, 24, 24)
    x[..., ::2] = 1.0  # mean 0.5
    plain = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    assert ((plain == 0) | (plain == 1)).all()
    assert (resize(x, (8, 8)) - 0.5).abs().max() < 0.06


def test_preprocess_normalizes_then_resizes():
    images = uint8_images(3, 3, 20, 24)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    expected = resize((images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1))
                      / torch.tensor(std).view(1, 3, 1, 1), (16, 16))
    got = Preprocess(16, mean, std, channels=3)(images)
    assert got.dtype == torch.float32 and got.shape == (3, 3, 16, 16)
    assert torch.allclose(got, expected, atol=1e-5)
    gray = uint8_images(2, 1, 10, 10)
    assert torch.allclose(Preprocess((12, 14), 0.5, 0.25, channels=1)(gray),
                          resize((gray.float() / 255 - 0.5) / 0.25, (12, 14)), atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=0), "input size must be a positive integer"),
    (dict(mean=(0.1, 0.2)), "mean has 2 values for 3-channel images"),
    (dict(std=(0.1, 0.0, 0.1)), "std must be positive"),
])
def test_preprocess_bad_settings(kwargs, message):
    settings = dict(input_size=16, mean=0.5, std=0.25, channels=3) | kwargs
    with pytest.raises(VggkitError, match=message):
        Preprocess(**settings)


def test_meta_names_the_interpolation_and_the_fit_and_defaults_to_the_old_resize():
    assert preprocess_meta() == {"interpolation": "bilinear", "antialias": "when shrinking", "align_corners": False,
                                 "resize": "center-crop"}
    assert preprocess_meta((20, 30))["image_size"] == [20, 30]
    # checkpoints written before the keys were recorded: that interpolation, and no fit ("plain")
    assert interpolation_of({}) == preprocess_meta() | {"resize": "plain"}
    meta = {"input_size": 28, "mean": [0.3], "std": [0.4], "classes": ["a"]}
    assert fit_size(meta) is None
    assert fit_size(meta | preprocess_meta((20, 30))) == (20, 30)
    assert fit_size(meta | preprocess_meta()) == (28, 28)  # a fit without a recorded size: to the input size
    assert settings_from_meta(meta | preprocess_meta()) == {"input_size": 28, "mean": [0.3], "std": [0.4],
                                                            "crop": None}
    # photos: stored larger, the input cut from their centre
    assert settings_from_meta(meta | preprocess_meta((32, 32), "center"))["crop"] == "center"
    with pytest.raises(VggkitError, match="crop this vggkit does not know"):
        settings_from_meta(meta | preprocess_meta() | {"crop": "random"})
    for unknown in ({"interpolation": "bicubic"}, {"resize": "letterbox"}):
        with pytest.raises(VggkitError, match="resize this vggkit does not know"):
            settings_from_meta(meta | unknown)


def test_fit_crops_the_centre_then_resizes():
    from vggkit.data.image import crop_box, fit

    assert crop_box(40, 17, (20, 20)) == (0, 11, 17, 28)  # the centred 17x17 square
    assert crop_box(10, 30, (5, 10)) == (5, 0, 25, 10)  # 2:1 out of 3:1
    wide = np.zeros((10, 30, 1), np.uint8)
    wide[:, 5:25] = 200  # the centre at the target's aspect ratio; the sides are cut off, not squashed in
    assert (fit(wide, (5, 10)) == 200).all()
    same = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert fit(same, (2, 2)) is same  # the stored size already: untouched


# ---------------------------------------------------------------- predict == training pipeline

def image_folder(root, channels, sizes, per_class=4):
    """Class folders of random images; sizes: one (h, w) for all, or one per image in turn."""
    rng = np.random.default_rng(channels)
    sizes = [sizes] if isinstance(sizes[0], int) else sizes
    for c, name in enumerate(("ant", "bee", "cat")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[(c * per_class + i) % len(sizes)]
            shape = (h, w) if channels == 1 else (h, w, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def every_kind_folder(root):
    """RGB, RGBA, palette, 16-bit gray and CMYK JPEG images of mixed sizes, as a user's folder may hold."""
    rng = np.random.default_rng(3)
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / "rgb.png")
        Image.fromarray(rng.integers(0, 256, (30, 21, 4), dtype=np.uint8), "RGBA").save(root / name / "rgba.png")
        Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)).save(root / name / "wide.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("P").save(root / name / "p.png")
        Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "CMYK").save(root / name / "c.jpg")
    return root


def trained_looking_vgg(channels, input_size, classes):
    torch.manual_seed(channels)
    model = VGG("1x8,1x16", in_channels=channels, num_classes=classes, input_size=input_size, fc_width=32,
                batch_norm=True)
    return like_trained(model, weight_noise=0.1)


MIXED = [(24, 24), (40, 17), (13, 30), (24, 24), (60, 48)]


@pytest.mark.slow
@pytest.mark.parametrize("channels, sizes, input_size", [
    (3, (24, 24), 16), (1, (12, 12), 20), (3, (16, 16), 16),  # one size
    (3, MIXED, 16), (1, MIXED, 32), (3, "every kind", 24),  # mixed sizes (fitted to the median), modes
])
def test_predict_gives_the_training_pipelines_logits(tmp_path, channels, sizes, input_size):
    root = tmp_path / "imgs"
    every_kind_folder(root) if sizes == "every kind" else image_folder(root, channels, sizes)
    splits = load_data(str(root), val_size=0, log=lambda *_: None)
    everything = Dataset(np.concatenate([splits.train.images, splits.test.images]),
                         np.concatenate([splits.train.labels, splits.test.labels]), splits.classes,
                         splits.train.paths + splits.test.paths)
    if sizes == (24, 24) or sizes == (16, 16):  # PNG is lossless: one size is stored exactly
        for path, image in zip(everything.paths, everything.images, strict=True):
            assert np.array_equal(np.asarray(Image.open(path)).reshape(image.shape), image)

    # what train.py stores with the weights
    meta = {"classes": splits.classes, "mean": list(splits.mean), "std": list(splits.std), "input_size": input_size,
            "dataset": splits.name, "is_sample": splits.is_sample, **preprocess_meta(splits.image_size)}
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last", trained_looking_vgg(splits.train.channels, input_size, 3), meta)
    assert read_meta(run)["resize"] == "center-crop" and read_meta(run)["image_size"] == list(splits.image_size)

    model, _ = load_model(run)
    loader = BatchLoader(everything, 5, input_size=input_size, mean=splits.mean, std=splits.std)  # no augment
    with torch.no_grad():
        pipeline = torch.cat([model(x) for x, _ in loader])
    logits, _ = predict_logits(run, everything.paths, device="cpu", batch_size=4)
    assert logits.shape == (len(everything), 3) and logits.dtype == torch.float32
    assert torch.allclose(logits, pipeline, rtol=1e-5, atol=1e-5)
    top1 = [result["top"][0]["index"] for result in predict(run, [root], top_k=1, device="cpu")]
    by_path = dict(zip(everything.paths, pipeline.argmax(1).tolist()))
    assert top1 == [by_path[p] for p in sorted(everything.paths)]  # a folder: its images, sorted


def test_models_from_before_the_fit_was_recorded_are_fed_as_before(tmp_path):
    """No "resize" in the metadata: every image straight to the input size (no crop), as vggkit did then."""
    image_folder(tmp_path / "imgs", 3, MIXED)
    path = tmp_path / "imgs" / "ant" / "1.png"  # 40 x 17
    meta = {"classes": ["ant", "bee", "cat"], "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 16,
            "model": {"in_channels": 3}}
    pixels = torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1)[None]
    assert torch.equal(model_inputs([path], meta), Preprocess(16, 0.5, 0.25, channels=3)(pixels))
    assert not torch.allclose(model_inputs([path], meta | preprocess_meta((16, 16))), model_inputs([path], meta))
