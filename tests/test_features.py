"""Named intermediate outputs, and the perceptual-loss example of vggkit.features' docstring."""
import textwrap

import pytest
import torch

from vggkit import features as F
from vggkit.convert import to_standard
from vggkit.errors import VggkitError
from vggkit.features import FeatureExtractor, layer_names
from vggkit.model import VGG


def small(batch_norm=True, in_channels=3):
    torch.manual_seed(0)
    return VGG("1x4,2x8", in_channels=in_channels, num_classes=3, input_size=16, fc_width=8,
               batch_norm=batch_norm).eval()


def test_names_follow_blocks_and_layers():
    assert layer_names(small()) == [
        "block1.conv1", "block1.bn1", "block1.relu1", "block1",
        "block2.conv1", "block2.bn1", "block2.relu1", "block2.conv2", "block2.bn2", "block2.relu2", "block2",
    ]
    assert layer_names(small(batch_norm=False))[:3] == ["block1.conv1", "block1.relu1", "block1"]
    assert len(layer_names(VGG("vgg16", num_classes=2, fc_width=8))) == 13 * 2 + 5  # block3.relu3 = relu3_3


def test_outputs_are_the_networks_own():
    model = small()
    x = torch.randn(2, 3, 16, 16)
    extractor = FeatureExtractor(model, ["block2", "block1", "block2.conv2", "block2.relu2"])
    with torch.no_grad():
        out = extractor(x)
        block1 = model.features[0](x.clone())
        block2 = model.features[1](block1.clone())
        conv2 = model.features[1][:4](block1.clone())
    assert list(out) == ["block2", "block1", "block2.conv2", "block2.relu2"]  # the order asked
    assert torch.equal(out["block1"], block1) and torch.equal(out["block2"], block2)
    assert torch.equal(out["block2.conv2"], conv2)  # not overwritten by the in-place ReLU after it
    assert out["block2.conv2"].min() < 0
    assert torch.equal(out["block2.relu2"], model.features[1][:6](block1.clone()))
    assert torch.equal(model.forward_features(x), block2)  # the model itself is unchanged


def test_only_the_layers_up_to_the_deepest_asked_run():
    model = small()
    calls = []
    for i, block in enumerate(model.features):
        block[0].register_forward_hook(lambda *_, i=i: calls.append(i))
    extractor = FeatureExtractor(model, ["block1.relu1"])
    extractor(torch.randn(1, 3, 16, 16))
    assert calls == [0] and len(extractor.steps) == 3


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(VggkitError) as info:
        FeatureExtractor(small(), ["block3"])
    message = str(info.value)
    assert message.startswith("unknown layer 'block3'; valid names: block1.conv1, block1.bn1,") and "block2.relu2" in message
    with pytest.raises(VggkitError, match="each once"):
        FeatureExtractor(small(), ["block1", "block1"])
    with pytest.raises(VggkitError, match="1 or 3 values"):
        FeatureExtractor(small(), ["block1"], mean=[0.5, 0.5], std=[0.2, 0.2])


def test_normalisation_from_mean_and_std():
    model = small()
    x = torch.rand(2, 3, 16, 16)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    got = FeatureExtractor(model, ["block1"], mean, std)(x)["block1"]
    expected = FeatureExtractor(model, ["block1"])((x - torch.tensor(mean).view(1, 3, 1, 1))
                                                   / torch.tensor(std).view(1, 3, 1, 1))["block1"]
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_the_docstring_perceptual_loss(tmp_path):
    """Runs the module docstring's example on a local standard-layout file instead of downloading vgg16."""
    torch.manual_seed(0)
    weights = VGG("vgg16", ratio=16, in_channels=3, num_classes=1000, input_size=224, fc_width=8)
    torch.save(to_standard(weights), tmp_path / "vgg16_small.pth")
    example = textwrap.dedent(F.__doc__.split("A perceptual loss")[1].split("\n", 1)[1])
    assert '"vgg16"' in example
    scope = {}
    exec(example.replace('"vgg16"', repr(str(tmp_path / "vgg16_small.pth"))), scope)
    extractor, perceptual_loss = scope["extractor"], scope["perceptual_loss"]
    assert torch.allclose(extractor.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))  # ImageNet's

    target = torch.rand(2, 3, 32, 32)
    output = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = perceptual_loss(output, target)
    loss.backward()
    assert loss.item() > 0 and output.grad is not None and output.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in extractor.parameters())  # frozen
    assert perceptual_loss(target, target).item() == 0


def test_from_pretrained_adapts_channels(tmp_path):
    torch.save(to_standard(small()), tmp_path / "w.pth")
    extractor = FeatureExtractor.from_pretrained(tmp_path / "w.pth", ["block2"], in_channels=1)
    assert extractor(torch.rand(1, 1, 16, 16))["block2"].shape == (1, 8, 4, 4)
    assert not extractor.normalize  # no known normalisation for these weights
