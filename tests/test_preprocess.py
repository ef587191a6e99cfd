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
from vggkit.predict import predict, predict_logits
from vggkit.preprocess import Preprocess, interpolation_of, preprocess_meta, resize, settings_from_meta


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


def test_meta_names_the_interpolation_and_defaults_to_it():
    assert preprocess_meta() == {"interpolation": "bilinear", "antialias": "when shrinking", "align_corners": False}
    assert interpolation_of({}) == preprocess_meta()  # checkpoints written before it was recorded
    meta = {"input_size": 28, "mean": [0.3], "std": [0.4], "classes": ["a"]}
    assert settings_from_meta(meta | preprocess_meta()) == {"input_size": 28, "mean": [0.3], "std": [0.4]}
    with pytest.raises(VggkitError, match="resize this vggkit does not know"):
        settings_from_meta(meta | {"interpolation": "bicubic"})


# ---------------------------------------------------------------- predict == training pipeline

def image_folder(root, channels, size, per_class=4):
    rng = np.random.default_rng(channels)
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if channels == 1 else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return sorted(root.glob("*/*.png"))  # class folders, then files: load_data's order


def trained_looking_vgg(channels, input_size, classes):
    torch.manual_seed(channels)
    model = VGG("1x8,1x16", in_channels=channels, num_classes=classes, input_size=input_size, fc_width=32,
                batch_norm=True)
    with torch.no_grad():  # weights and batch-norm statistics away from their init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("channels, stored, input_size", [(3, 24, 16), (1, 12, 20), (3, 16, 16)])
def test_predict_gives_the_training_pipelines_logits(tmp_path, channels, stored, input_size):
    paths = image_folder(tmp_path / "imgs", channels, stored)
    splits = load_data(str(tmp_path / "imgs"), val_size=0, log=lambda *_: None)
    for path, image in zip(paths, splits.train.images, strict=True):  # the same images, in the same order
        assert np.array_equal(np.asarray(Image.open(path)).reshape(image.shape), image)

    # what train.py stores with the weights
    meta = {"classes": splits.classes, "mean": list(splits.mean), "std": list(splits.std), "input_size": input_size,
            "dataset": splits.name, "is_sample": splits.is_sample, **preprocess_meta()}
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last", trained_looking_vgg(channels, input_size, 3), meta)
    assert read_meta(run)["interpolation"] == "bilinear"

    model, _ = load_model(run)
    loader = BatchLoader(splits.train, 5, input_size=input_size, mean=splits.mean, std=splits.std)  # no augment
    with torch.no_grad():
        pipeline = torch.cat([model(x) for x, _ in loader])
    logits, _ = predict_logits(run, paths, device="cpu")
    assert logits.shape == (len(paths), 3) and logits.dtype == torch.float32
    assert torch.allclose(logits, pipeline, rtol=1e-5, atol=1e-5)
    top1 = [result["top"][0]["index"] for result in predict(run, paths, top_k=1, device="cpu")]
    assert top1 == pipeline.argmax(1).tolist()
