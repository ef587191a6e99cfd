import pytest
import torch

from vggkit import VGG, VggkitError, parse_arch, vgg_block
from vggkit.model import VGGBlock, set_kernels

# Parameter counts of the standard implementations (torchvision vgg11 ... vgg19_bn), 3x224x224, 1000 classes.
STANDARD_PARAMS = {
    ("vgg11", False): 132_863_336, ("vgg11", True): 132_868_840,
    ("vgg13", False): 133_047_848, ("vgg13", True): 133_053_736,
    ("vgg16", False): 138_357_544, ("vgg16", True): 138_365_992,
    ("vgg19", False): 143_667_240, ("vgg19", True): 143_678_248,
}


def meta_vgg(*args, **kwargs):
    with torch.device("meta"):
        return VGG(*args, **kwargs)


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,batch_norm", list(STANDARD_PARAMS))
def test_presets_match_standard_parameter_counts(arch, batch_norm):
    model = meta_vgg(arch, in_channels=3, num_classes=1000, batch_norm=batch_norm)
    assert count(model) == STANDARD_PARAMS[arch, batch_norm]


@pytest.mark.slow
def test_textbook_block_shapes():
    model = VGG("d2l-vgg11")
    x = torch.randn(1, 1, 224, 224)
    shapes = []
    for block in model.features:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]
    dense = [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert model.classifier[1].in_features == 25088 and dense == [4096, 4096, 10]
    assert model.forward_features(torch.randn(2, 1, 224, 224)).shape == (2, 512, 7, 7)


def test_vgg_block_keeps_size_in_convs_and_halves_in_pool():
    block = vgg_block(3, 4, 8, batch_norm=True)
    kinds = [type(m).__name__ for m in block]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + ["MaxPool2d"]
    assert block(torch.randn(2, 4, 10, 14)).shape == (2, 8, 5, 7)


def test_forms_of_architecture_agree():
    assert parse_arch("vgg11") == parse_arch("1x64,1x128,2x256,2x512,2x512") == parse_arch(
        ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)))
    assert parse_arch(" 2X8 , 1x16 ") == ((2, 8), (1, 16))


def test_ratio_divides_conv_widths_and_optionally_dense():
    model = meta_vgg("d2l-vgg11", ratio=4)
    assert model.arch == ((1, 16), (1, 32), (2, 64), (2, 128), (2, 128))
    assert model.classifier[1].in_features == 128 * 7 * 7 and model.classifier[1].out_features == 4096
    scaled = meta_vgg("d2l-vgg11", ratio=4, scale_fc=True)
    assert scaled.classifier[1].out_features == 1024


def test_textbook_small_vgg_parameter_count():
    model = meta_vgg("d2l-vgg11", ratio=4)
    convs = [(1, 16), (16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128)]
    expected = sum(9 * i * o + o for i, o in convs) + (6272 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert count(model) == expected


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_init_zeroes_biases_and_scales_weights(init):
    torch.manual_seed(0)
    model = VGG("1x16,1x32", in_channels=1, input_size=28, fc_width=64, init=init)
    conv = model.features[1][0]
    assert torch.all(conv.bias == 0)
    fan_in, fan_out = 16 * 9, 32 * 9
    expected_std = (2 / (fan_in + fan_out)) ** 0.5 if init == "xavier" else (2 / fan_out) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.15)


def test_non_square_input_and_batch_norm_forward():
    model = VGG("1x8,1x16", in_channels=3, input_size=(32, 48), fc_width=32, batch_norm=True)
    assert model.classifier[1].in_features == 16 * 8 * 12
    assert model(torch.randn(4, 3, 32, 48)).shape == (4, 10)


@pytest.mark.parametrize("arch,ratio,message", [
    ("", 1, "empty"),
    ("1x64,,2x3", 1, "cannot read block"),
    ("1x64,abc", 1, "cannot read block"),
    ("0x64", 1, "must be positive"),
    ("1x0", 1, "must be positive"),
    ((), 1, "no blocks"),
    (((1, 64, 3),), 1, "not a (num_convs, channels) pair"),
    ("vgg11", 128, "empties block 1"),
    ("vgg11", 0, "positive integer"),
])
def test_bad_architectures_are_rejected(arch, ratio, message):
    with pytest.raises(VggkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_arch(arch, ratio)


def test_input_too_small_names_the_block_and_a_fix():
    with pytest.raises(VggkitError, match=r"reaches 0 at block 5 of 5; use an input size of at least 32"):
        meta_vgg("vgg11", input_size=31)
    meta_vgg("vgg11", input_size=32)


def small_vgg(**kwargs):
    options = dict(in_channels=3, num_classes=4, input_size=32, fc_width=16, batch_norm=True)
    return VGG("1x4,1x8", **{**options, **kwargs})


def test_forward_is_features_then_head():
    torch.manual_seed(0)
    model = small_vgg(head_pool="adaptive").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 8, 8, 8)
        assert torch.equal(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, 16)


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_reset_classifier_replaces_only_the_last_layer(init):
    torch.manual_seed(0)
    model = VGG("1x4,1x8", in_channels=1, num_classes=4, input_size=16, fc_width=400, init=init)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(300)
    assert model.num_classes == 300 and model.config()["num_classes"] == 300
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 300)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("classifier.7."))
    last = model.classifier[-1]
    assert torch.all(last.bias == 0)
    expected_std = (2 / (400 + 300)) ** 0.5 if init == "xavier" else 0.01  # as the model's init does
    assert last.weight.std().item() == pytest.approx(expected_std, rel=0.1)
    rebuilt = VGG(**model.config())
    rebuilt.load_state_dict(after)
    with pytest.raises(VggkitError, match="num_classes must be a positive integer"):
        model.reset_classifier(0)


def test_reset_classifier_keeps_dtype_and_device():
    model = small_vgg().to(torch.float64)
    model.reset_classifier(7)
    assert model.classifier[-1].weight.dtype == torch.float64
    with torch.device("meta"):
        meta = small_vgg()
    meta.reset_classifier(7)
    assert meta.classifier[-1].weight.is_meta


@pytest.mark.parametrize("options", [
    {}, {"head_pool": "adaptive", "init": "kaiming"}, {"input_size": [48, 80], "head_pool": "adaptive", "dropout": 0.1},
])
def test_config_rebuilds_the_same_network(options):
    model = small_vgg(**options)
    config = model.config()
    again = VGG(**config)
    assert again.config() == config
    assert [k for k in again.state_dict()] == [k for k in model.state_dict()]
    assert all(a.shape == b.shape for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_head_pool_adaptive_fixes_the_classifier_input():
    for size in (32, 64, (48, 80)):
        model = small_vgg(head_pool="adaptive", input_size=size)
        assert model.classifier[1].in_features == 8 * 7 * 7
    assert small_vgg(input_size=32).classifier[1].in_features == 8 * 8 * 8
    with pytest.raises(VggkitError, match="unknown head_pool 'max'; choose one of none, adaptive"):
        small_vgg(head_pool="max")


def test_frozen_blocks_get_no_gradient_and_keep_batch_norm_in_eval():
    model = VGG("1x4,1x8,1x8", in_channels=3, num_classes=2, input_size=16, fc_width=8, batch_norm=True)
    model.freeze_blocks(2)
    model.train()
    assert [block.training for block in model.features] == [False, False, True]
    assert model.classifier.training
    assert not any(p.requires_grad for p in model.features[:2].parameters())
    assert all(p.requires_grad for p in model.features[2].parameters())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.freeze_blocks(0)
    model.train()
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(VggkitError, match="cannot freeze 4 blocks of 3; give 0 to 3"):
        model.freeze_blocks(4)


# ---------------------------------------------------------------------------------------------
# Block layout: the last ReLU after the pool ("reordered", the default) vs every layer in order ("plain")

def plain_copy(model):
    """The same network computed as before the reorder: every block's layers in order."""
    import copy

    old = copy.deepcopy(model)
    assert set_kernels(old, "plain") == "plain"
    return old


def test_reordered_and_plain_layouts_compute_the_same():
    torch.manual_seed(0)
    model = small_vgg(dropout=0.0, input_size=(20, 26))  # odd sizes: 10x13 after block 1
    old = plain_copy(model)
    assert model.features[0].kernels == "reordered"
    x = torch.randn(3, 3, 20, 26)
    new_out, old_out = model(x), old(x)
    torch.testing.assert_close(new_out, old_out, rtol=0, atol=1e-6)
    new_out.square().sum().backward()
    old_out.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), old.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_old_state_dicts_load_into_either_layout():
    torch.manual_seed(0)
    model = small_vgg().eval()
    old = plain_copy(model)
    assert list(model.state_dict()) == list(old.state_dict())
    fresh = small_vgg().eval()
    fresh.load_state_dict(old.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), old(x), rtol=0, atol=1e-6)


def test_reordered_block_pools_before_its_last_relu():
    block = vgg_block(2, 3, 4)
    assert isinstance(block, VGGBlock) and "kernels=reordered" in repr(block)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    assert type(block(x).grad_fn).__name__ == "ReluBackward0"  # the ReLU ran last, on the pooled values
    block.kernels = "plain"
    assert type(block(x).grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
    assert torch.equal(block[:3](x), block[2](block[1](block[0](x))))  # a slice is its layers in order


def test_hooks_and_scripting_see_the_standard_layout():
    torch.manual_seed(0)
    model = small_vgg().eval()
    seen = []
    handle = model.features[0][-2].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    handle.remove()
    assert seen == [(2, 4, 32, 32)]  # the last ReLU's output before the pool, as in torchvision's VGG
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model)(x), expected)


def test_set_kernels_checks_the_mode():
    model = small_vgg()
    assert set_kernels(model, "plain") == "plain" and all(b.kernels == "plain" for b in model.features)
    with pytest.raises(VggkitError, match="unknown kernels mode 'turbo'; choose one of fast, reordered, plain"):
        set_kernels(model, "turbo")
