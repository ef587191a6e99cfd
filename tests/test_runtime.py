"""The fast paths compute what the plain path computes: channels-last and torch.compile (to float32
rounding), bf16 autocast (within bf16 tolerance), in-place ReLU, denormal flushing and the
retained-memory allocator (bit for bit), and the textbook per-sample resize vs the whole-batch
resize (within uint8 rounding)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vggkit import allocator
from vggkit.bench.textbook import TextbookBatches
from vggkit.data import Dataset
from vggkit.model import VGG
from vggkit.pipeline import BatchLoader
from vggkit.runtime import cpu_has_bf16


def small_model(batch_norm: bool, init: str = "xavier") -> VGG:
    torch.manual_seed(0)
    return VGG("1x8,2x16", in_channels=1, input_size=32, fc_width=64, dropout=0.0, batch_norm=batch_norm, init=init)


def batch(n=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def step(model, x, y, channels_last=False, amp=None, compile=False):
    """One training step's logits, loss and weight gradients (flattened), and the updated weights."""
    model = copy.deepcopy(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    forward = torch.compile(model) if compile else model
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        logits = forward(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.ndim > 1])
    optimizer.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return logits.detach().float(), loss.item(), grads, weights


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# PyTorch's float32 channels-last batch-norm backward: on one thread (OMP_NUM_THREADS=1) the network's
# weight gradients come out 1.7e-3 off the float64 ones (the first conv's, a small difference of large
# sums, move most), on two under 1e-5; NCHW's stay at float32 rounding either way.
CHANNELS_LAST_BATCH_NORM_GRADIENTS = 5e-3
CHANNELS_LAST_BATCH_NORM_WEIGHTS = 5e-4  # after one step at lr 0.05 (absolute; 1e-4 measured on one thread)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_channels_last_matches_nchw(batch_norm):
    model, (x, y) = small_model(batch_norm), batch()
    plain, fast = step(model, x, y), step(model, x, y, channels_last=True)
    assert torch.allclose(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    assert fast[1] == pytest.approx(plain[1], rel=1e-5)
    exact = step(copy.deepcopy(model).double(), x.double(), y)[2]
    assert rel(plain[2], exact) < 1e-5
    assert rel(fast[2], exact) < (CHANNELS_LAST_BATCH_NORM_GRADIENTS if batch_norm else 1e-5)
    assert torch.allclose(fast[3], plain[3], rtol=1e-5, atol=CHANNELS_LAST_BATCH_NORM_WEIGHTS if batch_norm else 1e-6)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_matches_fp32_within_bf16_tolerance(batch_norm, channels_last):
    model, (x, y) = small_model(batch_norm), batch()
    plain, fast = step(model, x, y), step(model, x, y, channels_last=channels_last, amp=torch.bfloat16)
    assert fast[0].dtype == torch.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); errors grow through the layers
    assert (fast[0] - plain[0]).abs().max() <= 3e-2 * plain[0].abs().max()
    assert fast[1] == pytest.approx(plain[1], rel=1e-2)
    assert F.cosine_similarity(fast[2], plain[2], dim=0) > 0.99
    assert rel(fast[2], plain[2]) < 0.15
    assert rel(fast[3], plain[3]) < 1e-2  # the updated weights (lr 0.05)


def test_bf16_forward_alone_matches_in_eval_mode():
    model, (x, _) = small_model(True), batch()
    model.eval()
    with torch.no_grad():
        plain = model(x)
        fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = fast_model(x.contiguous(memory_format=torch.channels_last)).float()
    assert (fast - plain).abs().max() <= 3e-2 * plain.abs().max()
    assert (fast.argmax(1) == plain.argmax(1)).float().mean() >= 0.9


@pytest.mark.slow
def test_compiled_model_matches_eager():
    """--compile on: torch.compile (inductor) computes the same step to float32 rounding."""
    model, (x, y) = small_model(True), batch()
    try:
        compiled = step(model, x, y, channels_last=True, compile=True)
    except Exception as e:  # inductor needs a C++ compiler on CPU
        if "compiler" in str(e).lower() or "cpp" in str(e).lower():
            pytest.skip(f"torch.compile cannot build here: {str(e).splitlines()[0]}")
        raise
    eager = step(model, x, y, channels_last=True)
    assert torch.allclose(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-5)
    assert rel(compiled[2], eager[2]) < CHANNELS_LAST_BATCH_NORM_GRADIENTS
    assert torch.allclose(compiled[3], eager[3], rtol=1e-5, atol=CHANNELS_LAST_BATCH_NORM_WEIGHTS)


def test_flushing_denormals_leaves_a_training_step_unchanged():
    """train() flushes denormal floats to zero on CPU; a step from initialisation has none to flush."""
    model, (x, y) = small_model(True), batch()
    plain = step(model, x, y, amp=torch.bfloat16)
    torch.set_flush_denormal(True)
    try:
        assert torch.tensor([1e-40]).mul(1.0).item() == 0.0  # flushing is on
        flushed = step(model, x, y, amp=torch.bfloat16)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(plain[0], flushed[0]) and plain[1] == flushed[1]
    assert torch.equal(plain[2], flushed[2]) and torch.equal(plain[3], flushed[3])


def test_inplace_relu_is_bit_for_bit():
    model, (x, y) = small_model(False), batch()
    outplace = copy.deepcopy(model)
    for m in outplace.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    a, b = step(model, x, y), step(outplace, x, y)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.skipif(not allocator.available(), reason="allocator tuning needs Linux with glibc")
def test_retained_memory_allocator_is_bit_for_bit_and_undoable():
    model, (x, y) = small_model(True), batch()
    plain = step(model, x, y)
    with allocator.allocator("retain"):
        assert allocator.mode() == "retain"
        retained = step(model, x, y)
        big = torch.ones(8 * 2**20)  # 32 MiB: served from the heap, freed, reused
        del big
        again = torch.zeros(8 * 2**20)
        assert again.sum() == 0
    assert allocator.mode() == "default"
    for a, b in zip(plain, retained):
        assert (a == b) if isinstance(a, float) else torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(not allocator.available(), reason="allocator tuning needs Linux with glibc")
def test_training_with_the_retained_allocator_is_bit_for_bit_and_leaves_the_process_as_it_was(tmp_path, fmnist_dir):
    from safetensors.torch import load_file

    from vggkit.train import train

    config = dict(arch="1x8,1x16", input_size=28, fc_width=32, epochs=1, batch_size=100, limit=500, test_limit=200,
                  val_size=100, precision="fp32", allow_sample=False, data_dir=str(fmnist_dir), out=str(tmp_path),
                  threads=1)
    threads = torch.get_num_threads()
    runs, lines = {}, []
    for mode in ("retain", "default", "auto"):
        history = train({**config, "allocator": mode, "name": mode}, progress="none", log=lines.append)
        runs[mode] = load_file(str(history.run_dir / "checkpoints/last/model.safetensors"))
        assert allocator.mode() == "default" and torch.get_num_threads() == threads
        assert torch.tensor([1e-40]).mul(1.0).item() != 0.0  # denormal flushing was switched off again
    assert any("1 threads, retain allocator" in line for line in lines)  # auto on CPU
    for name, tensor in runs["retain"].items():
        assert torch.equal(tensor, runs["default"][name]) and torch.equal(tensor, runs["auto"][name])


def test_allocator_rejects_unknown_mode():
    with pytest.raises(ValueError):
        with allocator.allocator("huge"):
            pass


def test_textbook_pipeline_matches_whole_batch_resize():
    """The textbook's per-sample PIL resize and the BatchLoader's batch resize give the same input."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    dataset = Dataset(images, np.arange(16) % 10, [str(i) for i in range(10)])
    textbook = TextbookBatches(dataset, 8, 224, seed=0)
    x, y = textbook.next()
    order = torch.as_tensor(textbook.order[:8])
    xb, yb = BatchLoader(dataset, 8, input_size=224)._batch(order, 0, 0)
    assert x.shape == xb.shape == (8, 1, 224, 224) and x.dtype == torch.float32
    assert torch.equal(y, yb)
    assert (x - xb).abs().max() <= 1 / 255 + 1e-6  # PIL rounds to uint8, the batch path does not
    assert 0 <= x.min() and x.max() <= 1


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_is_native_here():
    # speed_settings picks bf16 on such a CPU; the matmul runs in bf16 and returns bf16
    a = torch.randn(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


def test_memory_estimate_counts_what_autocast_adds():
    from vggkit.cost import summary

    model = small_model(False)
    fp32 = summary(model, batch_size=4, optimizer="sgd").memory()
    bf16 = summary(model, batch_size=4, optimizer="sgd", dtype="bfloat16").memory()
    cast = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())
    assert fp32["autocast_weights"] == 0 and bf16["autocast_weights"] == 2 * cast
    assert bf16["total"] == 2 * bf16["weights"] + bf16["activations"] + bf16["autocast_weights"]
    # the input batch: float32 (4 bytes) in both, plus its bf16 copy under autocast
    no_layers = summary(model, batch_size=4, dtype="bfloat16")
    no_layers.layers = []
    assert no_layers.memory()["activations"] == 4 * (4 + 2) * 32 * 32


def test_memory_estimate_same_for_inplace_and_outofplace_relu():
    # measured (BENCHMARKS.md): out of place, ReLU saves its output and the conv output it read is
    # freed, so the peak is the same as in place (1449 MiB both, VGG-11/4, batch 128, bf16)
    from vggkit.cost import summary

    model = small_model(False)
    inplace = summary(model, batch_size=4, dtype="bfloat16").memory()["total"]
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    assert summary(model, batch_size=4, dtype="bfloat16").memory()["total"] == inplace
