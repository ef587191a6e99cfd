"""SGD through bfloat16 weight copies (kernels.weight_copies) against torch.optim.SGD under autocast."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import copy_every_linear, require_kernels

from vggkit.config import TrainConfig
from vggkit.kernels import SGDWithWeightCopies
from vggkit.model import VGG, Linear, set_kernels
from vggkit.optim import make_optimizer


@pytest.fixture(autouse=True)
def _copies_for_small_layers(monkeypatch):
    copy_every_linear(monkeypatch)


@pytest.fixture(scope="module")
def fused():
    require_kernels()


def small_vgg(seed=0):
    torch.manual_seed(seed)
    return VGG(arch=((1, 8), (1, 16)), in_channels=1, num_classes=10, input_size=(16, 16), fc_width=64, dropout=0.5)


def batch(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def groups(model):
    decay = [p for p in model.parameters() if p.ndim > 1]
    return [{"params": decay, "weight_decay": 5e-4},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]


def trained(model, optimizer, steps=4, precision=torch.bfloat16, seed=1):
    model.train()
    for step in range(steps):
        x, y = batch(seed + step)
        torch.manual_seed(100 + step)  # the same dropout masks on both sides
        with torch.autocast("cpu", dtype=precision, enabled=precision is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def pair(momentum=0.9, nesterov=False, dampening=0.0):
    """(model, torch's SGD) and (model, SGD with copies of every classifier Linear), same weights."""
    options = dict(lr=0.05, momentum=momentum, nesterov=nesterov, dampening=dampening)
    plain, ours = small_vgg(), small_vgg()
    for model in (plain, ours):
        set_kernels(model, "fast")
    linears = [m for m in ours.classifier if isinstance(m, Linear)]
    return (plain, torch.optim.SGD(groups(plain), **options)), (ours, SGDWithWeightCopies(groups(ours), linears, **options))


def assert_close_models(a, b, atol=1e-6):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("momentum,nesterov,dampening", [(0.9, False, 0.0), (0.9, True, 0.0), (0.0, False, 0.0),
                                                         (0.5, False, 0.3)])
def test_training_equals_sgd_under_autocast(fused, momentum, nesterov, dampening):
    (plain, plain_opt), (ours, our_opt) = pair(momentum, nesterov, dampening)
    trained(plain, plain_opt)
    trained(ours, our_opt)
    assert_close_models(plain, ours)
    for module in ours.classifier:
        if isinstance(module, Linear):  # the copies were used, and hold the last weights in bf16
            assert module.weight_copy.tensor is not None
            assert torch.equal(module.weight_copy.tensor.detach(), module.weight.detach().bfloat16())
    assert plain_opt.state_dict()["state"].keys() == our_opt.state_dict()["state"].keys()
    for p, q in zip(plain.parameters(), ours.parameters()):
        a, b = plain_opt.state[p].get("momentum_buffer"), our_opt.state[q].get("momentum_buffer")
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_resuming_from_the_state_dicts_equals_training_on(fused):
    (_, _), (ours, opt) = pair()
    trained(ours, opt, steps=2)
    saved_model, saved_opt = copy.deepcopy(ours.state_dict()), copy.deepcopy(opt.state_dict())
    trained(ours, opt, steps=2, seed=3)

    (_, _), (resumed, resumed_opt) = pair()
    trained(resumed, resumed_opt, steps=1, seed=7)  # different weights and copies, then the saved ones loaded
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    trained(resumed, resumed_opt, steps=2, seed=3)
    assert_close_models(ours, resumed, atol=0)


def test_a_weight_changed_outside_the_step_is_copied_again(fused):
    (_, _), (ours, opt) = pair()
    trained(ours, opt, steps=1)
    first = ours.classifier[1]
    with torch.no_grad():
        first.weight.mul_(-1.0)
    x, _ = batch()
    ours.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = first(x.new_ones(4, first.in_features))
        expected = F.linear(x.new_ones(4, first.in_features), first.weight, first.bias)
    assert torch.equal(out, expected)
    assert torch.equal(first.weight_copy.tensor.detach(), first.weight.detach().bfloat16())


def test_copies_only_where_they_apply(fused):
    (_, _), (ours, opt) = pair()
    first = ours.classifier[1]
    x = torch.randn(4, first.in_features)
    ours.eval()  # inference, float32 training and no-grad use the weight as nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first(x)
    ours.train()
    first(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first(x)
    assert first.weight_copy.tensor is None
    trained(ours, opt, steps=1, precision=None)  # float32: every gradient on the weights, SGD's own step
    assert first.weight_copy.tensor is None and first.weight.grad is not None


def test_make_optimizer_keeps_copies_only_for_fused_kernels(fused):
    model = small_vgg()
    assert type(make_optimizer(TrainConfig(lr=0.05), model)) is torch.optim.SGD  # "reordered": no copies
    set_kernels(model, "fast")
    assert isinstance(make_optimizer(TrainConfig(lr=0.05), model), SGDWithWeightCopies)
    assert type(make_optimizer(TrainConfig(lr=0.05, optimizer="adamw"), model)) is torch.optim.AdamW
    set_kernels(model, "plain")
    assert type(make_optimizer(TrainConfig(lr=0.05, kernels="plain"), model)) is torch.optim.SGD


def test_state_dict_and_scripting_are_nn_linears(fused):
    (_, _), (ours, opt) = pair()
    trained(ours, opt, steps=1)
    reference = small_vgg()
    assert list(ours.state_dict()) == list(reference.state_dict())
    scripted = torch.jit.script(copy.deepcopy(ours).eval())
    x, _ = batch(n=2)
    torch.testing.assert_close(scripted(x), ours.eval()(x))
    assert copy.deepcopy(ours).classifier[1].weight_copy.tensor is None  # an EMA's copy holds none


def test_only_dense_layers_large_enough_get_a_copy(monkeypatch):
    """tuning.MIN_COPY_WEIGHTS: the d2l preset's 25.7M- and 16.8M-weight layers take copies, its 41K-weight
    last layer and the fast preset's (at most 295K weights) do not: autocast's cast measured faster there."""
    from vggkit.kernels import copyable_linears, tuning, why_not

    monkeypatch.undo()
    model = VGG("d2l-vgg11", ratio=4, num_classes=10, in_channels=1, input_size=224)
    sizes = [m.weight.numel() for m in copyable_linears(model)]
    assert sizes == [6272 * 4096, 4096 * 4096] and all(n >= tuning.MIN_COPY_WEIGHTS.value for n in sizes)
    small = model.classifier[-1]
    with torch.autocast("cpu", torch.bfloat16):
        reasons = why_not("linear_with_copy", [small], torch.randn(2, 4096))
    assert reasons[0].startswith("40,960 weights: under 1,000,000 a bfloat16 copy measured slower")

