"""The fused max-pool + ReLU kernels (vggkit.kernels) against PyTorch's relu(max_pool2d(x, 2, 2)):
forward equal, gradients equal, in float32 and bfloat16, NCHW and channels-last, odd sizes, ties,
negative-only windows and NaN; the fallback where the kernels cannot be built; a whole training
step of the fused network against the plain one. The C++ library is built once per session (a
minute the first time on a machine, then cached); without a compiler those tests are skipped."""
import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_no_further_off, backward_ops, require_kernels, train_step

from vggkit import kernels
from vggkit.config import resolve_config
from vggkit.errors import VggkitError
from vggkit.kernels import build
from vggkit.model import VGG, set_kernels
from vggkit.runtime import block_kernels

NAN = float("nan")
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def takes(x) -> bool:
    """Whether the pool kernel takes x (forward alone or with autograd)."""
    return not kernels.why_not("max_pool_relu", (), x)


def fusable(x) -> bool:
    """As takes, with autograd recording x's gradient."""
    return takes(x) and x.requires_grad and torch.is_grad_enabled()


@pytest.fixture(scope="module")
def fused():
    """The C++ kernels, built (or loaded from the cache) once for this module."""
    require_kernels()
    return kernels.MaxPoolReLU.apply


def reference(x):
    return torch.relu(F.max_pool2d(x, 2, 2))


def awkward_input(shape, dtype, memory_format, seed=0):
    """Small integers (many ties, zeros, negative-only windows), a few NaN, an all -inf window."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 3, shape, generator=g).to(dtype)
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:5]] = NAN
    x[0, 0, :2, :2] = -float("inf")
    x[0, -1, :2, :2] = torch.tensor([[1.0, NAN], [2.0, NAN]])  # the last NaN of a window takes the gradient
    return x.contiguous(memory_format=memory_format)


def forward_and_grads(fn, x, grad):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("shape", [(2, 16, 8, 10), (3, 5, 7, 9), (1, 32, 3, 2)], ids=["even", "odd", "tiny"])
def test_forward_and_gradients_equal_pytorchs(fused, layout, precision, shape):
    x = awkward_input(shape, DTYPES[precision], FORMATS[layout])
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(x.dtype)
    y, gx = forward_and_grads(fused, x, grad)
    y_ref, gx_ref = forward_and_grads(reference, x, grad)
    assert_same(y, y_ref)
    assert_same(gx, gx_ref)  # each input gradient is one output gradient or 0: no rounding, even in bf16
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=FORMATS[layout])
    assert gx.is_contiguous(memory_format=FORMATS[layout])
    if shape[2] % 2:
        assert not gx[:, :, -1].any()  # the row MaxPool2d drops gets no gradient


def test_gradient_of_a_non_contiguous_output_gradient(fused):
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 3, 8).permute(0, 3, 1, 2)  # neither layout's strides match x's
    assert_same(forward_and_grads(fused, x, grad)[1], forward_and_grads(reference, x, grad)[1])


def test_gradcheck_in_float64(fused):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)  # continuous: no ties
    assert torch.autograd.gradcheck(fused, (x,))
    x_nhwc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fused, (x_nhwc,))


def test_empty_output_gives_a_zero_gradient(fused):
    x = torch.randn(2, 4, 1, 5, requires_grad=True)
    y = fused(x)
    y.sum().backward()
    assert y.shape == (2, 4, 0, 2) and x.grad.shape == x.shape and not x.grad.any()


def test_max_pool_relu_fuses_only_where_autograd_runs_on_the_cpu(fused):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    assert type(kernels.max_pool_relu(x).grad_fn).__name__ == "MaxPoolReLUBackward"
    with torch.no_grad():  # inference: the kernel's forward alone, PyTorch's values to the bit
        assert_same(kernels.max_pool_relu(x), reference(x))
        assert takes(x) and not fusable(x)
    assert not fusable(x.detach()) and not fusable(x.half()) and not takes(x.half())
    assert not fusable(torch.randn(4, 6, 6, requires_grad=True))  # 3-D: PyTorch's ops
    assert not fusable(torch.randn(2, 4, 6, 6, device="meta", requires_grad=True))


def test_kernels_setting_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert block_kernels("auto", cpu) == block_kernels("fast", cpu) == "fast"
    assert block_kernels("auto", cuda) == block_kernels("fast", cuda) == "reordered"
    assert block_kernels("plain", cpu) == block_kernels("plain", cuda) == "plain"
    with pytest.raises(VggkitError, match="kernels must be one of fast, plain, auto"):
        block_kernels("turbo", cpu)
    assert resolve_config().kernels == "fast" and resolve_config(overrides={"kernels": "auto"}).kernels == "auto"
    with pytest.raises(VggkitError, match="kernels must be one of fast, plain, auto, got 'turbo'"):
        resolve_config(overrides={"kernels": "turbo"})


# ---------------------------------------------------------------------------------------------
# Where the kernels cannot be had


@pytest.fixture
def fresh_notes(monkeypatch):
    monkeypatch.setattr(build, "_noted", set())


def test_switched_off_library_says_why_once(monkeypatch, capsys, fresh_notes):
    monkeypatch.setenv(build.SWITCH, "plain")
    library = build.KernelLibrary()
    assert not library.available() and not library.available()
    assert library.reason == "VGGKIT_KERNELS=plain"
    err = capsys.readouterr().err
    assert err == "vggkit: note: fast CPU kernels unavailable (VGGKIT_KERNELS=plain); using PyTorch's own ops\n"


def test_missing_compiler_is_named(monkeypatch, capsys, fresh_notes):
    monkeypatch.delenv(build.SWITCH, raising=False)
    monkeypatch.setenv("CXX", "/no/such/c++")
    library = build.KernelLibrary()
    assert not library.available()
    assert "no C++ compiler: /no/such/c++ not found" in library.reason
    assert capsys.readouterr().err.count("\n") == 1


def test_failed_build_falls_back_to_pytorchs_ops(monkeypatch, tmp_path, capsys, fresh_notes):
    """A compiler that fails (`false`) in an empty cache: the build fails, the model still trains."""
    if shutil.which("false") is None:
        pytest.skip("no `false` command to stand in for a broken compiler")
    monkeypatch.delenv(build.SWITCH, raising=False)
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    broken = build.KernelLibrary()
    monkeypatch.setattr(build, "LIBRARY", broken)
    model = VGG("1x4,1x8", in_channels=1, input_size=8, fc_width=8, num_classes=3)
    assert set_kernels(model, "fast") == "reordered"
    assert broken.reason.startswith("build failed")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    assert not fusable(x)
    assert_same(kernels.max_pool_relu(x), reference(x))
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    notes = [line for line in capsys.readouterr().err.splitlines() if "unavailable" in line]
    assert len(notes) == 1 and notes[0].startswith("vggkit: note: fast CPU kernels unavailable (build failed")


def test_compile_error_is_reported_in_one_line(monkeypatch, tmp_path, fresh_notes):
    if shutil.which(build.compiler()) is None:
        pytest.skip(f"no C++ compiler ({build.compiler()})")
    monkeypatch.delenv(build.SWITCH, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = tmp_path / "broken.cpp"
    source.write_text("#error broken on purpose\n")
    library = build.KernelLibrary(source)
    assert not library.available()
    assert library.reason.startswith("build failed: ") and "broken on purpose" in library.reason
    assert "\n" not in library.reason


@pytest.mark.slow
def test_a_finished_build_is_loaded_without_the_builder(fused, tmp_path):
    """Once built, a new process loads the library straight from the cache: no cpp_extension import
    (setuptools) and no ninja run at every start."""
    import subprocess
    import sys

    assert (build.LIBRARY.build_dir() / build.BUILT).is_file()
    probe = ("import sys; from vggkit.kernels import build; assert build.LIBRARY.available(), build.LIBRARY.reason; "
             "import torch; assert hasattr(torch.ops.vggkit, 'max_pool_relu'); "
             "print('torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "False"


def test_a_damaged_or_unfinished_build_is_not_loaded(tmp_path):
    """BUILT naming a file that is gone or not what was built: the builder runs instead (and repairs
    it); tests/test_kernel_cache.py damages a real build."""
    assert build._load_built(tmp_path) is not None  # nothing built
    (tmp_path / build.BUILT).write_text("vggkit_kernels_gone.so 13 " + "0" * 64)
    assert build._load_built(tmp_path) is not None
    (tmp_path / "vggkit_kernels_bad.so").write_text("not a library")
    (tmp_path / build.BUILT).write_text("vggkit_kernels_bad.so 13 " + "0" * 64)
    assert build._load_built(tmp_path) is not None


def test_cache_folder_names_torch_and_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = build.KernelLibrary().build_dir()
    assert folder.parent == tmp_path / "vggkit" / "kernels"
    assert folder.name.startswith(torch.__version__ + "-")
    other = tmp_path / "other.cpp"
    other.write_text("// another source\n")
    assert build.KernelLibrary(other).build_dir() != folder
    first, *rest = build.SOURCES
    assert rest and build.KernelLibrary([first, other]).build_dir() != folder  # every source counts


def test_openmp_only_with_gcc_on_linux(monkeypatch):
    """at::parallel_for is OpenMP in torch's headers: without -fopenmp the kernels run on one thread."""
    monkeypatch.setattr(build.sys, "platform", "linux")
    monkeypatch.setattr(build, "_is_gcc", lambda command: True)
    assert build.openmp_flags() == (["-fopenmp"] if torch.backends.openmp.is_available() else [])
    monkeypatch.setattr(build, "_is_gcc", lambda command: False)
    assert build.openmp_flags() == []
    monkeypatch.setattr(build.sys, "platform", "darwin")
    monkeypatch.setattr(build, "_is_gcc", lambda command: True)
    assert build.openmp_flags() == []


# ---------------------------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_training_step_fused_equals_plain(fused, precision, batch_norm):
    torch.manual_seed(0)
    model = VGG("1x8,2x16", in_channels=1, input_size=16, fc_width=32, num_classes=5, dropout=0.0,
                batch_norm=batch_norm).to(memory_format=torch.channels_last)
    plain, float_model = copy.deepcopy(model), copy.deepcopy(model)
    assert set_kernels(model, "fast") == "fast" and set_kernels(plain, "plain") == "plain"
    set_kernels(float_model, "plain")
    x = torch.randn(32, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (32,))
    loss, grads = train_step(model, x, y, precision)
    loss_plain, grads_plain = train_step(plain, x, y, precision)
    tolerance = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=1e-3)
    # max(relu(x)) = relu(max(x)) exactly; the fused batch norm sums in another order
    torch.testing.assert_close(loss, loss_plain, **tolerance)
    if precision == "bf16" and batch_norm:
        # the first block (ConvBatchNormPoolReLU) rounds its bf16 output once, PyTorch's modules twice:
        # from there on the two differ by more than a rounding, so both are held against float32
        assert_no_further_off(grads, grads_plain, train_step(float_model, x, y, "fp32")[1])
    else:
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_plain[name], **tolerance, msg=name)
    calls = backward_ops(model(x).sum())
    # each block's end is one fused op: the first block [conv, (bn,) ReLU, pool] on the input one
    # ConvBatchNormPoolReLU (test_conv_bn_pool.py) or ConvPoolReLU (test_conv_pool.py), the second
    # BatchNormPoolReLU (test_bn_pool.py) or MaxPoolReLU
    expected = ({"ConvBatchNormPoolReLUBackward": 1, "BatchNormPoolReLUBackward": 1} if batch_norm
                else {"ConvPoolReLUBackward": 1, "MaxPoolReLUBackward": 1})
    assert {name: calls.count(name) for name in expected} == expected and "MaxPool2DWithIndicesBackward0" not in calls
    assert ("ConvReLUBackward" in calls) == (not batch_norm)  # the second block's first conv and its ReLU
    assert calls.count("BatchNormReLUBackward") == (1 if batch_norm else 0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fused_optimizer_step_equals_the_plain_one(optimizer):
    from vggkit.optim import make_optimizer

    torch.manual_seed(0)
    model = VGG("1x4,1x8", in_channels=1, input_size=8, fc_width=8, num_classes=3, batch_norm=True)
    plain = copy.deepcopy(model)
    fast = make_optimizer(resolve_config(overrides={"optimizer": optimizer, "kernels": "fast", "lr": 0.1}), model)
    slow = make_optimizer(resolve_config(overrides={"optimizer": optimizer, "kernels": "plain", "lr": 0.1}), plain)
    assert fast.param_groups[0]["fused"] and not slow.param_groups[0]["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for net, opt in ((model, fast), (plain, slow)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("conv", [dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
                                  dict(in_channels=1, out_channels=4, kernel_size=3, padding=1, bias=False),
                                  dict(in_channels=4, out_channels=6, kernel_size=3, padding=0, stride=2)],
                         ids=["3x3", "one-channel-no-bias", "strided"])
def test_conv_relu_equals_conv_then_relu(layout, precision, conv):
    torch.manual_seed(0)
    conv, relu = torch.nn.Conv2d(**conv), torch.nn.ReLU()
    x = torch.randn(2, conv.in_channels, 9, 8).contiguous(memory_format=FORMATS[layout]).requires_grad_()
    assert not kernels.why_not("conv_relu", [conv, relu], x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        fused, plain = kernels.conv_relu(conv, x), relu(conv(x))
    assert fused.dtype == plain.dtype and fused.shape == plain.shape
    tolerance = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(fused, plain, **tolerance)
    inputs = [t for t in (x, conv.weight, conv.bias) if t is not None]
    grad = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(fused, inputs, grad), torch.autograd.grad(plain, inputs, grad)):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)


def test_conv_relu_is_left_to_pytorch_where_it_cannot_apply():
    conv, relu = torch.nn.Conv2d(2, 3, 3, padding="same"), torch.nn.ReLU()
    x = torch.randn(1, 2, 5, 5)
    assert kernels.why_not("conv_relu", [conv, relu], x)  # padding="same"
    assert not kernels.OPS["conv_relu"].covers([torch.nn.Conv2d(2, 3, 3), torch.nn.Identity(), relu, torch.nn.MaxPool2d(2)], 0)
    hooked = torch.nn.Conv2d(2, 3, 3)
    hooked.register_forward_hook(lambda *a: None)
    assert kernels.why_not("conv_relu", [hooked, relu], x)


def test_dropout_keeps_one_minus_p_scaled_and_its_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = kernels.dropout(x, 0.3)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, y.detach())
    torch.manual_seed(1)
    first = kernels.dropout(torch.ones(50), 0.5)
    torch.manual_seed(1)
    assert torch.equal(first, kernels.dropout(torch.ones(50), 0.5))  # the seed decides the mask


def test_dropout_masks_are_unbiased_at_every_position_and_odd_sizes():
    torch.manual_seed(0)
    kept = torch.stack([kernels.dropout(torch.ones(3, 7), 0.25) != 0 for _ in range(4000)]).float().mean(0)
    assert kept.shape == (3, 7)  # 21 values: not a whole number of 64-bit draws
    assert (kept - 0.75).abs().max().item() < 0.03  # each of a draw's four 16-bit parts, the sign bit too


def test_model_dropout_uses_the_fast_mask_only_when_training_fused():
    model = VGG("1x4", in_channels=1, input_size=8, fc_width=400, num_classes=3, dropout=0.5, batch_norm=False)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2
    set_kernels(model, "fast")
    x = torch.ones(64, 400)
    fast = drops[0](x)
    assert abs((fast == 0).float().mean().item() - 0.5) < 0.02 and fast.max().item() == 2.0
    drops[0].eval()
    assert torch.equal(drops[0](x), x)
    drops[0].train()
    set_kernels(model, "plain")
    assert drops[0].kernels == "plain" and abs((drops[0](x) == 0).float().mean().item() - 0.5) < 0.02


def test_conv_weight_grad_stays_with_onednn_without_amx(monkeypatch):
    from vggkit.kernels import conv_weight_grad

    monkeypatch.setattr(conv_weight_grad, "_amx", lambda: False)  # as on a CPU without AMX (e.g. AMD Zen 5)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    x = torch.randn(2, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.why_not("conv_tiled_weight_grad", [conv], x)  # a conv before batch norm stays nn.Conv2d
        assert not kernels.why_not("conv_relu", [conv, torch.nn.ReLU()], x)
        fused, plain = kernels.conv_relu(conv, x), torch.relu(conv(x))
    grad = torch.randn_like(plain)
    got = torch.autograd.grad(fused, conv.weight, grad)[0]
    torch.testing.assert_close(got, torch.autograd.grad(plain, conv.weight, grad)[0], rtol=1e-2, atol=1e-2)
