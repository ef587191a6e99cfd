"""Initial weights for fine-tuning: sources, adapting to new data, freezing, the known-name download."""
import functools
import hashlib
import http.server
import socket
import threading

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vggkit import pretrained as P
from vggkit.checkpoint import save_checkpoint
from vggkit.convert import to_standard
from vggkit.errors import VggkitError
from vggkit.model import VGG
from helpers import like_trained

ARCH = "1x4,1x8,1x8,1x8,1x8"  # five blocks: a 7x7 map at 224, as the ImageNet weights


def quiet(_):
    pass


def imagenet_like(seed=0, batch_norm=True):
    """A tiny VGG shaped like the ImageNet ones (3 channels, 1000 classes, 224, 7x7 before the classifier)."""
    torch.manual_seed(seed)
    model = VGG(ARCH, in_channels=3, num_classes=1000, input_size=224, fc_width=16, batch_norm=batch_norm)
    return like_trained(model)


@pytest.fixture
def standard_pth(tmp_path):
    source = imagenet_like()
    path = tmp_path / "vgg_standard.pth"
    torch.save(to_standard(source), path)
    return path, source


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_fine_tuning_from_a_standard_state_dict(standard_pth):
    path, source = standard_pth
    notes = []
    model, meta = P.init_model(path, num_classes=5, input_size=32, freeze=2, log=notes.append)
    assert model.config()["head_pool"] == "adaptive" and model.num_classes == 5
    assert meta["mean"] == list(P.IMAGENET_MEAN) and meta["input_size"] == [32, 32]
    assert any("classifier replaced" in n for n in notes) and any("head_pool adaptive" in n for n in notes)
    assert any("froze blocks 1-2 of 5" in n for n in notes)
    loaded = snapshot(model)
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if not k.startswith("classifier.7"))

    frozen = {k: v for k, v in loaded.items() if k.startswith(("features.0.", "features.1."))}
    assert any("running_mean" in k for k in frozen) and any("num_batches_tracked" in k for k in frozen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # weights and BN buffers, bit for bit
    assert not torch.equal(after["classifier.7.weight"], loaded["classifier.7.weight"])  # the new head learned
    assert not torch.equal(after["features.2.0.weight"], loaded["features.2.0.weight"])  # the rest trains
    assert not torch.equal(after["features.2.1.running_mean"], loaded["features.2.1.running_mean"])


def test_rgb_weights_on_grayscale_data_sum_the_first_convolution(standard_pth):
    path, source = standard_pth
    notes = []
    model, meta = P.init_model(path, in_channels=1, log=notes.append)
    assert model.in_channels == 1 and model.num_classes == 1000
    assert any("summed over its 3 input channels" in n for n in notes)
    assert meta["mean"] == [pytest.approx(sum(P.IMAGENET_MEAN) / 3)]
    gray = torch.rand(2, 1, 224, 224)
    with torch.no_grad():  # a gray image through the summed conv = the same image as RGB through the original
        torch.testing.assert_close(model.eval()(gray), source(gray.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)


def test_grayscale_weights_spread_over_rgb_channels():
    torch.manual_seed(0)
    gray_model = VGG("1x4,1x8", in_channels=1, num_classes=3, input_size=16, fc_width=8).eval()
    rgb, meta = P.adapt(gray_model, {"mean": [0.3], "std": [0.2]}, in_channels=3, log=quiet)
    assert meta["mean"] == [0.3] * 3 and meta["std"] == [0.2] * 3
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rgb.eval()(x.expand(-1, 3, -1, -1)), gray_model(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(VggkitError, match="cannot fit weights for 3 input channels to 4-channel data"):
        P.adapt(rgb, in_channels=4, log=quiet)


def test_from_a_vggkit_checkpoint_and_run(tmp_path):
    model = VGG("1x4,1x8", in_channels=1, num_classes=3, input_size=16, fc_width=8, init="kaiming")
    meta = {"classes": ["a", "b", "c"], "mean": [0.3], "std": [0.2], "input_size": 16, "dataset": "x"}
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best", model, meta)
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "best",
                   tmp_path / "run" / "checkpoints" / "best" / "model.safetensors"):
        loaded, got = P.load_init(source, log=quiet)
        assert loaded.config() == model.config() and got["classes"] == ["a", "b", "c"] and "model" not in got
    adapted, got = P.init_model(tmp_path / "run", num_classes=5, freeze="features", log=quiet)
    assert adapted.num_classes == 5 and "classes" not in got and got["mean"] == [0.3]
    assert adapted.init == "kaiming" and adapted.frozen_blocks == 2
    assert not any(p.requires_grad for p in adapted.features.parameters())


def test_safetensors_without_vggkit_metadata_is_a_standard_state_dict(tmp_path):
    source = imagenet_like(batch_norm=False)
    save_file({k: v.contiguous() for k, v in to_standard(source).items()}, str(tmp_path / "w.safetensors"))
    model, meta = P.load_init(tmp_path / "w.safetensors", log=quiet)
    assert model.config()["arch"] == ARCH and meta["dataset"] == "imagenet"


def test_other_standard_weights_carry_no_imagenet_normalisation(tmp_path):
    torch.save(to_standard(VGG("1x4,1x8", in_channels=1, num_classes=3, input_size=16, fc_width=8)), tmp_path / "w.pt")
    _, meta = P.load_init(tmp_path / "w.pt", log=quiet)
    assert "mean" not in meta and meta["input_size"] == [16, 16]


@pytest.mark.parametrize("content, message", [
    ({"fc.weight": torch.zeros(2, 2)}, "no conv weights features.<i>.weight found (first key: 'fc.weight')"),
    ({"net": nn.Linear(1, 1)}, "it holds a pickled torch.nn.modules.linear.Linear, which needs pickle code"),
    ([1, 2], "does not hold a state dict of tensors"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    torch.save(content, tmp_path / "bad.pth")
    with pytest.raises(VggkitError) as info:
        P.init_model(tmp_path / "bad.pth", log=quiet)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_requests_are_one_line_errors(standard_pth, tmp_path):
    path, _ = standard_pth
    cases = [
        ({"arch": "vgg11"}, "the initial weights have arch 1x4,1x8,1x8,1x8,1x8, not 1x64,1x128,2x256"),
        ({"arch": "vgg11", "ratio": 16}, "not 1x4,1x8,2x16,2x32,2x32"),
        ({"batch_norm": False}, "the initial weights have batch_norm True, not False"),
        ({"scale_fc": True}, "unknown model option 'scale_fc'"),
        ({"freeze": 6}, "freeze takes a number of blocks from 0 to 5 or 'features', got 6"),
        ({"freeze": "some"}, "got 'some'"),
        ({"input_size": 32, "head_pool": "none"}, "classifier.1.weight has shape (16, 392) in the weights but (16, 8)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(VggkitError) as info:
            P.init_model(path, log=quiet, **kwargs)
        assert message in str(info.value), kwargs
    with pytest.raises(VggkitError, match="no weights at .*nowhere: give a vggkit run"):
        P.load_init(tmp_path / "nowhere")


def test_matching_options_are_accepted(standard_pth):
    path, _ = standard_pth
    model, _ = P.init_model(path, arch="1x64,1x128,1x128,1x128,1x128", ratio=16, batch_norm=True, fc_width=16,
                            dropout=0.2, init="kaiming", log=quiet)
    assert (model.dropout, model.init) == (0.2, "kaiming")


def test_input_size_that_no_pool_can_fit():
    model = VGG("1x4,1x8", in_channels=1, num_classes=3, input_size=16, fc_width=8)  # classifier takes 4x4
    assert P.adapt(model, input_size=18, log=quiet)[0].config()["head_pool"] == "none"  # still 4x4
    with pytest.raises(VggkitError, match="takes a 4x4 feature map .* input 32x32 gives 8x8; use input size 16"):
        P.adapt(model, input_size=32, log=quiet)


def test_freeze_blocks_accepts_counts_and_features():
    model = VGG("1x4,1x8,1x8", in_channels=1, num_classes=3, input_size=16, fc_width=8)
    assert P.freeze_blocks(model, "2", log=quiet) == 2 and model.frozen_blocks == 2
    assert P.freeze_blocks(model, "features", log=quiet) == 3
    assert P.freeze_blocks(model, 0, log=quiet) == 0 and all(p.requires_grad for p in model.parameters())


# --- the known names: torchvision's ImageNet weights, served here by a local server ---

def test_known_names_are_torchvisions_published_files():
    assert sorted(P.STANDARD_WEIGHTS) == sorted(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))
    assert P.STANDARD_WEIGHTS["vgg16"] == "vgg16-397923af.pth"
    assert P.BASE_URL == "https://download.pytorch.org/models/"


@pytest.fixture
def web(tmp_path, monkeypatch):
    """A 127.0.0.1 server over tmp_path/www; the cache in tmp_path/xdg."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setattr(P, "BASE_URL", f"http://127.0.0.1:{server.server_port}/models/")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (root / "models").mkdir()
    yield root / "models", tmp_path / "xdg" / "vggkit" / "weights"
    server.shutdown()
    server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def publish(folder, monkeypatch, body: bytes, prefix: str | None = None) -> str:
    prefix = prefix or hashlib.sha256(body).hexdigest()[:8]
    name = f"vgg11_bn-{prefix}.pth"
    (folder / name).write_bytes(body)
    monkeypatch.setitem(P.STANDARD_WEIGHTS, "vgg11_bn", name)
    return name


def weights_bytes(tmp_path) -> bytes:
    torch.save(to_standard(imagenet_like()), tmp_path / "w.pth")
    return (tmp_path / "w.pth").read_bytes()


def test_known_name_downloads_verifies_and_caches(web, tmp_path, monkeypatch):
    folder, cache = web
    name = publish(folder, monkeypatch, weights_bytes(tmp_path))
    notes = []
    model, meta = P.init_model("vgg11_bn", num_classes=10, input_size=32, log=notes.append, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [name]
    assert model.num_classes == 10 and model.config()["head_pool"] == "adaptive"
    assert meta["dataset"] == "imagenet" and meta["std"] == list(P.IMAGENET_STD)
    assert any(n.startswith("downloading http://127.0.0.1") for n in notes)
    (folder / name).unlink()  # cached: no second request
    again, _ = P.load_init("VGG11_BN", log=quiet)
    assert torch.equal(again.state_dict()["features.0.0.weight"], model.state_dict()["features.0.0.weight"])


def test_known_name_with_a_wrong_hash_leaves_nothing(web, tmp_path, monkeypatch):
    folder, cache = web
    publish(folder, monkeypatch, weights_bytes(tmp_path), prefix="00000000")
    with pytest.raises(VggkitError) as info:
        P.load_init("vgg11_bn", log=quiet, progress=False)
    assert "not the published 00000000" in str(info.value) and "was not kept" in str(info.value)
    assert list(cache.iterdir()) == []


def test_known_name_offline_is_a_clear_error(web, monkeypatch):
    _, cache = web
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(P, "BASE_URL", f"http://127.0.0.1:{port}/models/")
    with pytest.raises(VggkitError, match=r"cannot download http://127.0.0.1:\d+/models/vgg11_bn-6002323d.pth "
                                          r"\(.*refused.*\); check the connection"):
        P.load_init("vgg11_bn", log=quiet, progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_known_name_missing_on_the_server(web, monkeypatch):
    with pytest.raises(VggkitError, match=r"vgg11_bn-6002323d.pth \(HTTP 404 File not found\)"):
        P.load_init("vgg11_bn", log=quiet, progress=False)
