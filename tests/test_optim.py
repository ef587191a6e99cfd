"""The optimizer and schedule tables: the learning rate at each step, what each optimizer builds."""
import pytest
import torch

from vggkit import VGG, TrainConfig
from vggkit.config import CHOICES
from vggkit.cost import summary
from vggkit.optim import OPTIMIZER_STATES, OPTIMIZERS, SCHEDULES, TRAINING_OPTIMIZERS, lr_at, make_optimizer
from vggkit.train import lr_at as lr_at_from_train
from vggkit.train import make_optimizer as make_optimizer_from_train


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"lr": 0.1, "warmup": 0.2, **changes})


def small_model() -> VGG:
    return VGG("1x4", in_channels=1, input_size=8, fc_width=8, num_classes=3, batch_norm=True)


# ---------------------------------------------------------------------------------------------- schedule

def test_no_schedule_keeps_the_learning_rate():
    assert [lr_at(config(schedule="none"), step, 100) for step in (0, 50, 100, 150)] == [0.1] * 4


def test_cosine_falls_from_lr_to_zero_and_stays_there():
    c = config(schedule="cosine")
    assert lr_at(c, 0, 100) == pytest.approx(0.1)
    assert lr_at(c, 50, 100) == pytest.approx(0.05)
    assert lr_at(c, 25, 100) == pytest.approx(0.1 * (0.5 + 0.5 * 2 ** -0.5))
    assert lr_at(c, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(c, 130, 100) == lr_at(c, 100, 100)


def test_onecycle_warms_up_from_a_tenth_then_decays_linearly_to_zero():
    c = config(schedule="onecycle", warmup=0.2)
    assert lr_at(c, 0, 100) == pytest.approx(0.01)  # lr / 10
    assert lr_at(c, 10, 100) == pytest.approx(0.055)  # half-way up: 0.1 + 0.9 * 0.5 of lr
    assert lr_at(c, 20, 100) == pytest.approx(0.1)  # the peak at the end of the warm-up
    assert lr_at(c, 60, 100) == pytest.approx(0.05)  # half-way down
    assert lr_at(c, 100, 100) == pytest.approx(0.0, abs=1e-12)
    steps = [lr_at(c, s, 100) for s in range(101)]
    assert steps.index(max(steps)) == 20 and all(a <= b for a, b in zip(steps[:20], steps[1:21]))
    assert all(a >= b for a, b in zip(steps[20:], steps[21:]))


def test_schedule_survives_zero_total_steps():
    assert lr_at(config(schedule="cosine"), 0, 0) == pytest.approx(0.1)
    assert lr_at(config(schedule="cosine"), 1, 0) == pytest.approx(0.0, abs=1e-12)


def test_every_schedule_choice_has_an_entry():
    assert set(SCHEDULES) == set(CHOICES["schedule"])


# ---------------------------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_each_optimizer_builds_with_no_weight_decay_on_biases_and_batch_norm(name, cls):
    model = small_model()
    optimizer = make_optimizer(config(optimizer=name, weight_decay=5e-4), model)
    assert type(optimizer) is cls and all(g["lr"] == 0.1 for g in optimizer.param_groups)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    batch_norm = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norm and all(any(p is q for q in no_decay["params"]) for m in batch_norm for p in m.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_sgd_is_nesterov_only_with_momentum():
    model = small_model()
    with_momentum = make_optimizer(config(optimizer="sgd", momentum=0.9, nesterov=True), model).param_groups[0]
    assert with_momentum["momentum"] == 0.9 and with_momentum["nesterov"] is True
    plain = make_optimizer(config(optimizer="sgd", momentum=0.0, nesterov=True), model).param_groups[0]
    assert plain["momentum"] == 0.0 and plain["nesterov"] is False


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_tensors_per_parameter_are_what_the_optimizer_keeps(name):
    """The count the memory estimate uses, checked against the state torch really allocates."""
    model = small_model()
    optimizer = OPTIMIZERS[name].build([{"params": list(model.parameters())}],
                                       config(momentum=0.9 if name == "momentum" else 0.0))
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    for p in model.parameters():
        kept = [v for v in optimizer.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
        assert len(kept) == OPTIMIZERS[name].state_tensors


def test_the_names_come_from_the_one_table():
    assert TRAINING_OPTIMIZERS == ("sgd", "adam", "adamw") == tuple(CHOICES["optimizer"])
    assert OPTIMIZER_STATES == {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
    weights = 4 * sum(p.numel() for p in small_model().parameters())
    for name, states in OPTIMIZER_STATES.items():
        assert summary(small_model(), optimizer=name).memory()["optimizer_state"] == states * weights
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        summary(small_model(), optimizer="lbfgs")


def test_train_still_exports_the_schedule_and_the_optimizer():
    assert lr_at_from_train is lr_at and make_optimizer_from_train is make_optimizer


def test_sgd_keeps_no_weight_copies_when_processes_train_the_model_together(monkeypatch):
    """Under DDP every weight must get its gradient: with world_size > 1, plain SGD even for "fused" Linears."""
    from helpers import copy_every_linear, require_kernels

    copy_every_linear(monkeypatch)
    from vggkit.kernels import SGDWithWeightCopies
    from vggkit.model import set_kernels

    require_kernels()
    model = VGG(arch=((1, 8), (1, 16)), in_channels=1, num_classes=10, input_size=(16, 16), fc_width=64)
    set_kernels(model, "fused")
    assert isinstance(make_optimizer(config(), model), SGDWithWeightCopies)
    assert type(make_optimizer(config(), model, world_size=2)) is torch.optim.SGD
