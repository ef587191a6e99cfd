"""kernels.routing: the plan each block takes equals what the predicates it replaced chose (recorded
on main before they were removed, for the fast and d2l presets and a few architectures, training
and inference, float32 and bf16); the plan from shapes (plan_block) equals the route taken on real
tensors (route_block); each op's reasons; the mode vocabulary; the tuning table; summary --explain;
no import circle between the model and the kernels."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import copy_every_linear, require_kernels

from vggkit import kernels
from vggkit.config import TrainConfig
from vggkit.errors import VggkitError
from vggkit.kernels import build, conv_weight_grad, routing, tuning
from vggkit.model import VGG, set_kernels
from vggkit.optim import make_optimizer

CASES = {
    "fast": dict(arch="1x32,2x64,2x128", in_channels=1, input_size=28, fc_width=256, batch_norm=True, dropout=0.3),
    "d2l": dict(arch="d2l-vgg11", ratio=4, in_channels=1, input_size=224, fc_width=4096, batch_norm=False, dropout=0.5),
    "best": dict(arch="2x64,2x128,3x256", in_channels=1, input_size=28, fc_width=512, batch_norm=True, dropout=0.3),
    "vgg11-rgb": dict(arch="vgg11", ratio=8, in_channels=3, input_size=32, fc_width=64, batch_norm=False),
    "vgg11-bn-rgb": dict(arch="vgg11", ratio=8, in_channels=3, input_size=32, fc_width=64, batch_norm=True),
    "gray-2conv-bn": dict(arch="2x16,1x32", in_channels=1, input_size=16, fc_width=32, batch_norm=True),
}
# What main's predicates (VGGBlock._pool_first, _fast_layers, the *_fusable/_takes/_faster/applies/_foldable
# functions) chose on an AMX machine, batch 4: per block the kernels called in order, then the classifier's,
# then how many weight gradients ran on the AMX tiles in the backward. cbp conv_batch_norm_pool_relu, cp
# conv_pool_relu, br batch_norm_relu, b the same without ReLU, bp batch_norm_pool_relu, ct a conv alone
# for its tiled weight gradient, cr conv_relu, p max_pool_relu, f folded_block (f+cp: its last conv pooled
# by conv_pool_relu; f+p: max_pool_relu after it), d dropout, l linear_with_copy.
OLD = {
    "fast/train/fp32": ("cbp | br bp | br bp", "d d", 0),
    "fast/train/bf16": ("cbp | ct br ct bp | ct br ct bp", "l d l d l", 4),
    "fast/eval/fp32": ("f f+cp | f f+p | f f+p", "", 0),
    "fast/eval/bf16": ("f f+cp | f f+p | f f+p", "", 0),
    "d2l/train/fp32": ("cp | p | cr p | cr p | cr p", "d d", 0),
    "d2l/train/bf16": ("cp | p | cr ct p | cr ct p | cr ct p", "l d l d l", 6),
    "d2l/eval/fp32": ("cp | p | cr p | cr p | cr p", "", 0),
    "d2l/eval/bf16": ("cp | p | cr p | cr p | cr p", "", 0),
    "best/train/fp32": ("br bp | br bp | br br bp", "d d", 0),
    "best/train/bf16": ("br ct bp | ct br ct bp | ct br ct br ct bp", "l d l d l", 6),
    "best/eval/fp32": ("f f+p | f f+p | f f+p", "", 0),
    "best/eval/bf16": ("f f+p | f f+p | f f+p", "", 0),
    "vgg11-rgb/train/fp32": ("p | p | cr p | cr p | cr p", "d d", 0),
    "vgg11-rgb/train/bf16": ("p | p | cr ct p | cr ct p | cr ct p", "l d l d l", 5),
    "vgg11-rgb/eval/fp32": ("p | p | cr p | cr p | cr p", "", 0),
    "vgg11-rgb/eval/bf16": ("p | p | cr p | cr p | cr p", "", 0),
    "vgg11-bn-rgb/train/fp32": ("bp | bp | br bp | br bp | br bp", "d d", 0),
    "vgg11-bn-rgb/train/bf16": ("bp | bp | br ct bp | ct br ct bp | ct br ct bp", "l d l d l", 5),
    "vgg11-bn-rgb/eval/fp32": ("f f+p | f f+p | f f+p | f f+p | f f+p", "", 0),
    "vgg11-bn-rgb/eval/bf16": ("f f+p | f f+p | f f+p | f f+p | f f+p", "", 0),
    "gray-2conv-bn/train/fp32": ("br bp | bp", "d d", 0),
    "gray-2conv-bn/train/bf16": ("br bp | bp", "l d l d l", 0),
    "gray-2conv-bn/eval/fp32": ("f f+p | f f+p", "", 0),
    "gray-2conv-bn/eval/bf16": ("f f+p | f f+p", "", 0),
}
SHORT = {"conv_batch_norm_pool_relu": "cbp", "conv_pool_relu": "cp", "batch_norm_pool_relu": "bp", "conv_relu": "cr",
         "conv_tiled_weight_grad": "ct", "max_pool_relu": "p", "dropout": "d", "linear_with_copy": "l"}


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    require_kernels()
    copy_every_linear(monkeypatch)  # OLD was recorded before tuning.MIN_COPY_WEIGHTS


def _short(steps) -> str:
    names, after_folded = [], False
    for step in steps:
        if step.op == "folded_block":
            names += ["f", "f+cp"] if step.option else ["f"]
        elif step.op == "batch_norm_relu":
            names.append("br" if step.option else "b")
        elif step.op in SHORT:
            names.append("f+p" if after_folded and step.op == "max_pool_relu" else SHORT[step.op])
        after_folded = step.op == "folded_block"
    return " ".join(names)


def _expected(key):
    blocks, head, tiles = OLD[key]
    if not conv_weight_grad._amx():  # main's predicates without AMX: no conv alone, no weight gradient on tiles
        blocks, tiles = " ".join(n for n in blocks.split(" ") if n != "ct"), 0
    return blocks, head, tiles


@pytest.mark.parametrize("key", sorted(OLD))
def test_the_plan_is_what_the_old_predicates_chose(key, monkeypatch):
    case, phase, precision = key.split("/")
    args = CASES[case]
    torch.manual_seed(0)
    model = VGG(num_classes=10, **args)
    assert set_kernels(model, "fast") == "fast"
    if phase == "train":
        make_optimizer(TrainConfig(lr=0.05, optimizer="sgd", momentum=0.9), model)  # gives the weight copies
    model.train(phase == "train")
    head, tiled = [], []
    for op in ("dropout", "linear_with_copy"):
        original = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, op=op, original=original: head.append(SHORT[op]) or original(*a))
    original_grad = conv_weight_grad.weight_grad
    monkeypatch.setattr(conv_weight_grad, "weight_grad", lambda *a: tiled.append(1) or original_grad(*a))
    x = torch.randn(4, args["in_channels"], args["input_size"], args["input_size"])
    spec = routing.Spec.of(x)
    routes, plans = [], []
    with torch.set_grad_enabled(phase == "train"), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        for block in model.features:
            planned, spec = routing.plan_block(block, spec)
            steps = []
            x = routing.route_block(block, x, steps)
            assert routing.Spec.of(x) == spec  # the shapes-only plan follows the real tensors
            routes.append(_short(steps))
            plans.append(_short(planned))
        y = model.forward_head(x)
    if phase == "train":
        y.float().sum().backward()
    blocks, head_expected, tiles = _expected(key)
    assert " | ".join(routes) == blocks
    assert " | ".join(plans) == blocks
    assert " ".join(head) == head_expected
    assert len(tiled) == tiles


def test_each_op_says_why_not():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    assert "RGB" in " ".join(routing.why_not("conv_pool_relu", [conv], x))  # measured slower on RGB
    assert routing.why_not("conv_pool_relu", [conv], x, tuned=False) == []  # but the kernel takes it
    on_gpu = routing.Spec((2, 3, 8, 8), torch.float32, torch.device("cuda"))
    assert "not on the CPU (cuda)" in routing.why_not("max_pool_relu", (), on_gpu)
    assert any("float16" in r for r in routing.why_not("max_pool_relu", (), x.half()))
    bn = nn.BatchNorm2d(3)
    assert routing.why_not("batch_norm_relu", [bn], x.requires_grad_()) == []
    assert any("eval mode" in r for r in routing.why_not("batch_norm_relu", [bn.eval()], x))
    with torch.no_grad():
        assert any("inference" in r for r in routing.why_not("batch_norm_relu", [bn.train()], x))
    hooked = nn.Conv2d(3, 16, 3, padding=1)
    hooked.register_forward_hook(lambda *a: None)
    assert "forward hooks on the Conv2d" in routing.why_not("conv_relu", [hooked, nn.ReLU()], x)


def test_without_the_library_every_op_says_so(monkeypatch):
    monkeypatch.setenv(build.SWITCH, "plain")
    monkeypatch.setattr(build, "LIBRARY", build.KernelLibrary())
    reasons = routing.why_not("max_pool_relu", (), torch.randn(2, 3, 4, 4))
    assert reasons == [f"no C++ kernels ({build.SWITCH}=plain)"]


def test_every_op_is_in_the_priority_list_or_the_classifier():
    assert set(routing.PRIORITY) | {"dropout", "linear_with_copy"} == set(routing.OPS)


def test_one_mode_vocabulary_with_the_old_spellings():
    assert routing.MODES == ("fast", "reordered", "plain")
    assert routing.mode_named("fused") == routing.mode_named("auto") == "fast"
    assert routing.mode_for("auto", torch.device("cuda")) == "reordered"
    model = VGG("1x8", in_channels=1, input_size=8, fc_width=8)
    assert set_kernels(model, "fused") == "fast"
    with pytest.raises(VggkitError, match="unknown kernels mode 'turbo'; choose one of fast, reordered, plain"):
        set_kernels(model, "turbo")
    assert TrainConfig().kernels == "fast"


def test_tuning_says_where_it_was_measured():
    for threshold in (*tuning.PYTHON_TUNING.values(), *tuning.CXX_TUNING.values()):
        assert threshold.measured_on and threshold.means
    cpu = tuning.cpu_features()
    assert isinstance(cpu.capability, str)
    note = tuning.measured_here(tuning.MIN_IN_CHANNELS)
    assert (note == "") == cpu.amx


def test_the_kernels_do_not_import_the_model():
    """model -> kernels and never back (weight_copies took Linear from model; it now asks for the
    weight_copy slot)."""
    for source in Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level == 2 and node.module == "model") and node.module != "vggkit.model", source.name


def test_summary_explain(capsys):
    from vggkit.cli import main

    assert main(["summary", "--preset", "fast", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "preset fast" in out and "training (" in out and "inference (" in out
    assert "block 1     conv_batch_norm_pool_relu" in out
    assert "not folded_block: autograd records (training): batch statistics" in out
    assert main(["summary", "--arch", "1x16,1x32", "--in-channels", "3", "--input-size", "16", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "not conv_pool_relu: 3 input channels (RGB)" in out
    assert main(["summary", "--preset", "d2l"]) == 2
    assert "--preset goes with --explain" in capsys.readouterr().err


def test_summary_explain_of_a_trained_run(tmp_path, capsys):
    """--run: the network a run saved (here RGB, 16 px) and its settings (weights alone: fp32, the fast kernels)."""
    from vggkit.checkpoint import save_checkpoint
    from vggkit.cli import main

    model = VGG("1x16,1x32", in_channels=3, input_size=16, fc_width=32, num_classes=4)
    run = tmp_path / "runs" / "rgb"
    save_checkpoint(run / "checkpoints" / "best", model, {"classes": list("abcd")})
    assert main(["summary", "--run", str(run), "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run}\n") and "training (float32, batch 128, input 3x16x16)" in out
    assert "not conv_pool_relu: 3 input channels (RGB)" in out
    assert main(["summary", "--run", str(run)]) == 2
    assert "--run goes with --explain" in capsys.readouterr().err
