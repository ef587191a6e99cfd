"""head_pool="adaptive": the standard VGG's 7x7 average pool, in ops that export to ONNX and TorchScript."""
import warnings

import numpy as np
import pytest
import torch
from torch.nn.functional import adaptive_avg_pool2d

from vggkit.checkpoint import save_checkpoint
from vggkit.export import export_model
from vggkit.model import VGG, StaticAdaptiveAvgPool2d, adaptive_windows

ARCH = "1x4,1x4,1x8,1x8,1x8"  # five blocks, as the standard VGGs: input 32 -> 1x1, 64 -> 2x2, 224 -> 7x7


def model_at(size, seed=0):
    torch.manual_seed(seed)
    return VGG(ARCH, in_channels=3, num_classes=3, input_size=size, fc_width=16, batch_norm=True,
               head_pool="adaptive").eval()


def reference(model, x):
    """The same network with torch's own adaptive pooling, as torchvision's VGG computes it."""
    return model.classifier(adaptive_avg_pool2d(model.features(x), (7, 7)))


def test_windows_are_adaptive_pooling_windows():
    assert adaptive_windows(7, 7) == [(i, i + 1) for i in range(7)]
    assert adaptive_windows(1, 7) == [(0, 1)] * 7
    assert adaptive_windows(10, 7) == [(0, 2), (1, 3), (2, 5), (4, 6), (5, 8), (7, 9), (8, 10)]


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (7, 7), (14, 14), (3, 5), (9, 13), (13, 9), (10, 10), (7, 21)])
def test_pool_equals_adaptive_avg_pool2d(size):
    x = torch.randn(2, 5, *size)
    pool = StaticAdaptiveAvgPool2d(size)
    torch.testing.assert_close(pool(x), adaptive_avg_pool2d(x, (7, 7)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("size", [32, 64, 224, (48, 80), 100])
def test_model_equals_standard_pooling(size):
    model = model_at(size)
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model, x), atol=1e-6, rtol=1e-5)


def test_adaptive_at_its_own_size_is_the_plain_model():
    adaptive, plain = model_at(224), VGG(ARCH, in_channels=3, num_classes=3, input_size=224, fc_width=16,
                                         batch_norm=True).eval()
    plain.load_state_dict(adaptive.state_dict())  # same keys and shapes: the pool has no parameters
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(adaptive(x), plain(x))


def test_state_dict_does_not_change_with_the_pool():
    assert list(model_at(32).state_dict()) == list(VGG(ARCH, in_channels=3, num_classes=3, input_size=224,
                                                       fc_width=16, batch_norm=True).state_dict())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    found = {}
    for size in (32, 64, 224):
        model = model_at(size, seed=size)
        with torch.no_grad():  # non-trivial batch-norm statistics, so that the export has something to get wrong
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        meta = {"classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": size, "dataset": "x"}
        save_checkpoint(root / str(size), model, meta)
        found[size] = (root / str(size), model)
    return found


@pytest.mark.parametrize("size", [32, 64, 224])
def test_onnx_export_matches_standard_pooling(checkpoints, size):
    import onnxruntime as ort

    directory, model = checkpoints[size]
    result = export_model(directory, "onnx", out=directory / "model.onnx")
    assert result["max_abs_diff"] <= 1e-4
    x = torch.randn(2, 3, size, size)
    session = ort.InferenceSession(result["out"], providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, reference(model, x).numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_torchscript_export_matches_standard_pooling(checkpoints, size):
    directory, model = checkpoints[size]
    result = export_model(directory, "torchscript", out=directory / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(result["out"])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(model, x), atol=1e-5, rtol=1e-4)
