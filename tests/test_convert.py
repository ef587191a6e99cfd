import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vggkit.convert import from_standard, load_standard, to_standard
from vggkit.errors import VggkitError
from vggkit.model import VGG
from vggkit.specs import PRESETS, format_arch

# torchvision's models/vgg.py configurations, and its make_layers / VGG, rebuilt here.
CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
CASES = [(name, bn) for name in CFGS for bn in (False, True)]


class StandardVGG(nn.Module):
    def __init__(self, cfg, batch_norm, div=1, num_classes=1000, fc_width=4096, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(c, v // div, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v // div))
            layers.append(nn.ReLU(inplace=True))
            c = v // div
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(c * 7 * 7, fc_width), nn.ReLU(True), nn.Dropout(),
            nn.Linear(fc_width, fc_width), nn.ReLU(True), nn.Dropout(),
            nn.Linear(fc_width, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def small_standard(name, batch_norm, in_channels=3):
    torch.manual_seed(0)
    model = StandardVGG(CFGS[name], batch_norm, div=32, num_classes=5, fc_width=16, in_channels=in_channels)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
    return model.eval()


@pytest.mark.parametrize("name, batch_norm", CASES)
def test_full_size_layout_on_meta(name, batch_norm):
    with torch.device("meta"):
        standard = StandardVGG(CFGS[name], batch_norm).state_dict()
    model = from_standard(standard)
    config = model.config()
    assert config["arch"] == format_arch(PRESETS[name]) and config["batch_norm"] == batch_norm
    assert (config["in_channels"], config["num_classes"], config["fc_width"]) == (3, 1000, 4096)
    assert config["input_size"] == [224, 224]
    back = to_standard(model)
    assert list(back) == list(standard)
    assert all(back[k].shape == standard[k].shape for k in standard)

    with torch.device("meta"):
        ours = VGG(name, batch_norm=batch_norm, num_classes=1000)
    assert list(to_standard(ours)) == list(standard)


@pytest.mark.slow
@pytest.mark.parametrize("name, batch_norm", CASES)
def test_round_trip_and_same_outputs(name, batch_norm):
    standard = small_standard(name, batch_norm)
    state = standard.state_dict()
    model = from_standard(state)
    assert not model.training

    back = to_standard(model)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)  # BN running stats and counters included

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = standard(x)
        assert expected.abs().max() > 0
        assert torch.allclose(model(x), expected, atol=1e-6, rtol=0)


def test_vggkit_to_standard_to_vggkit():
    torch.manual_seed(1)
    model = VGG("1x4,2x8", in_channels=1, num_classes=3, input_size=16, fc_width=8, batch_norm=True)
    standard = to_standard(model.state_dict())
    assert "features.7.weight" in standard and "classifier.6.bias" in standard  # 1 conv+BN+ReLU+pool, then 2nd block
    again = from_standard(standard)
    assert again.config() == model.config()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_explicit_arguments_override_inference():
    state = small_standard("vgg11", False).state_dict()
    model = from_standard(state, arch="1x2,1x4,2x8,2x16,2x16", batch_norm=False, num_classes=5, in_channels=3,
                          input_size=230, fc_width=16, dropout=0.1)
    assert model.input_size == (230, 230) and model.dropout == 0.1


def test_missing_num_batches_tracked_is_tolerated():
    state = {k: v for k, v in small_standard("vgg11", True).state_dict().items() if "num_batches_tracked" not in k}
    model = from_standard(state)
    assert int(model.features[0][1].num_batches_tracked) == 0


@pytest.mark.parametrize("change, kwargs, message", [
    (lambda s: {**s, "fc.weight": torch.zeros(1)}, {}, "unexpected key 'fc.weight'"),
    (lambda s: {k: v for k, v in s.items() if k != "features.3.bias"}, {}, "missing key 'features.3.bias'"),
    (lambda s: {"module." + k: v for k, v in s.items()}, {}, "module.features.0.weight"),
    (lambda s: s, {"arch": "vgg13"}, "unexpected key 'features.3.weight'"),
    (lambda s: s, {"num_classes": 10}, "classifier.6.weight has shape"),
    (lambda s: s, {"batch_norm": True}, "unexpected key"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("classifier.6")}, {}, "'classifier.6.weight'"),
    (lambda s: {k.replace("features.3.", "features.4."): v for k, v in s.items()}, {}, "features.4.weight is 4 indices"),
])
def test_bad_state_dicts_name_the_first_bad_key(change, kwargs, message):
    with torch.device("meta"):
        state = StandardVGG(CFGS["vgg11"], False).state_dict()
    with pytest.raises(VggkitError, match=message.replace("(", r"\(")) as info:
        from_standard(change(state), **kwargs)
    assert "\n" not in str(info.value)


def test_to_standard_rejects_foreign_keys():
    with pytest.raises(VggkitError, match="'features.0.weight'"):
        to_standard({"features.0.weight": torch.zeros(1)})


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_standard(tmp_path, suffix):
    standard = small_standard("vgg11", True, in_channels=1)
    path = tmp_path / f"vgg11_bn{suffix}"
    state = {k: v.contiguous() for k, v in standard.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = load_standard(path)
    assert model.in_channels == 1 and model.batch_norm
    x = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), standard(x), atol=1e-6, rtol=0)


def test_load_standard_bad_files(tmp_path):
    with pytest.raises(VggkitError, match="no weights file"):
        load_standard(tmp_path / "nope.pth")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(VggkitError, match="cannot tell the format"):
        load_standard(tmp_path / "w.bin")
    (tmp_path / "w.pth").write_bytes(b"not a zip")
    with pytest.raises(VggkitError, match="cannot read weights"):
        load_standard(tmp_path / "w.pth")
    torch.save({"net": nn.Linear(1, 1)}, tmp_path / "pickled.pth")  # needs pickle: refused by weights_only
    with pytest.raises(VggkitError, match="cannot read weights"):
        load_standard(tmp_path / "pickled.pth")


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64, (48, 80), 224])
def test_standard_weights_at_another_input_size_get_the_adaptive_pool(size):
    standard = small_standard("vgg11", True)  # classifier.0 takes 16 x 7 x 7, as the ImageNet weights' 512 x 7 x 7
    model = from_standard(standard.state_dict(), input_size=size)
    expected_pool = "none" if size == 224 else "adaptive"  # at 224 the blocks give 7x7 by themselves
    assert model.config()["head_pool"] == expected_pool
    x = torch.randn(2, 3, *((size, size) if isinstance(size, int) else size))
    with torch.no_grad():
        assert torch.allclose(model(x), standard(x), atol=1e-6, rtol=0)  # torchvision's function at that size
    assert list(to_standard(model)) == list(standard.state_dict())


def test_head_pool_inference_without_input_size_and_when_nothing_fits():
    state = small_standard("vgg11", False).state_dict()
    model = from_standard(state)
    assert model.input_size == (224, 224) and model.config()["head_pool"] == "none"
    assert from_standard(state, head_pool="adaptive").input_size == (224, 224)
    small = to_standard(VGG("1x4,1x8", in_channels=1, num_classes=3, input_size=16, fc_width=8))  # 4x4 map
    assert from_standard(small).config()["head_pool"] == "none"
    with pytest.raises(VggkitError, match=r"classifier.0.weight takes 128 inputs but the 8x2x2 feature map at "
                                          r"input 8x8 gives 32 \(392 pooled to 7x7\)"):
        from_standard(small, input_size=8)


def test_load_standard_takes_a_vggkit_layout_state_dict(tmp_path):
    model = VGG("1x4,1x8", in_channels=1, num_classes=3, input_size=16, fc_width=8, batch_norm=True).eval()
    torch.save(model.state_dict(), tmp_path / "mine.pth")
    loaded = load_standard(tmp_path / "mine.pth")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pickled_objects_are_refused_naming_what_was_found(tmp_path):
    torch.save({"net": nn.Linear(1, 1)}, tmp_path / "pickled.pth")
    with pytest.raises(VggkitError) as info:
        load_standard(tmp_path / "pickled.pth")
    message = str(info.value)
    assert "a pickled torch.nn.modules.linear.Linear, which needs pickle code" in message and "\n" not in message


def test_block_layouts_share_the_standard_state_dict():
    """The reordered blocks (ReLU after the pool) and the plain ones map to the same torchvision keys."""
    from vggkit.model import set_kernels

    torch.manual_seed(0)
    model = VGG("1x4,2x8", in_channels=1, num_classes=3, input_size=16, fc_width=8, batch_norm=True)
    reordered = to_standard(model)
    set_kernels(model, "plain")
    plain = to_standard(model)
    assert list(reordered) == list(plain) and all(torch.equal(reordered[k], plain[k]) for k in plain)
    again = from_standard(plain)
    assert again.features[0].kernels == "reordered"
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(again(x), model.eval()(x), atol=1e-6, rtol=0)
