"""Sizes from outside are bounded before anything of that size is allocated, read or decompressed
(issue 27, items 5, 9 and 11): flags (--arch, --input-size, --crop-padding, --fc-width), TOML
files, dataset files (IDX headers and gzip streams, CIFAR archives and their extracted files), and
a closed stdout.

Every case asserts exit code 2, the one line naming the limit, and that nothing was written. The
cases that would take gigabytes were their bound to regress run in a subprocess under RLIMIT_AS
(LIMIT): a regression then fails the test (MemoryError, exit 1) instead of exhausting the machine.
The bad files are made here, small on disk: gzip bombs are one member of zeros repeated (gzip
readers join members), a huge extracted file is sparse.
"""
import functools
import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vggkit import bounds
from vggkit.cli import main
from vggkit.config import resolve_config
from vggkit.errors import VggkitError

LIMIT = 2 << 30  # address space of the subprocesses: vggkit's own needs are well under 1 GiB
BOMB = 3 << 30  # bytes a bomb decompresses to: more than LIMIT
TINY = ["--data", "fashion-mnist-sample", "--arch", "1x8", "--input-size", "28", "--fc-width", "16", "--limit", "200",
        "--test-limit", "100", "--val-size", "100", "--batch-size", "50", "--epochs", "1", "--precision", "fp32",
        "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("VGGKIT_DEBUG", raising=False)


def snapshot(root: Path) -> dict:
    """Every path under root with its size: what "nothing written" compares."""
    return {p: (p.stat().st_size if p.is_file() else None) for p in sorted(root.rglob("*"))}


def one_line(err: str, *needles: str) -> str:
    assert err.count("\n") == 1 and err.startswith("vggkit: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def limited(*argv, cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`vggkit ARGV` in a subprocess whose address space is capped at LIMIT."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT})); "
            "from vggkit.cli import main; sys.exit(main(sys.argv[1:]))")
    # no GPU: a CUDA context alone would reserve more address space than LIMIT
    env = {k: v for k, v in os.environ.items() if k not in ("VGGKIT_DEBUG", "VGGKIT_DATA")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, **kwargs)


@functools.lru_cache
def zeros_member() -> bytes:
    return gzip.compress(bytes(64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB


def zeros_gzip(n: int) -> bytes:
    """gzip data of n zero bytes (n a multiple of 64 MiB, or any n below it), small on disk."""
    whole, rest = divmod(n, 64 << 20)
    return zeros_member() * whole + (gzip.compress(bytes(rest)) if rest else b"")


def idx_header(*dims: int) -> bytes:
    return b"\0\0\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def fashion_mnist_dir(root: Path, train_images: bytes) -> Path:
    """A Fashion-MNIST folder whose train images file is `train_images` (gz); the others are tiny."""
    folder = root / "fm"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(train_images)
    for name, dims in (("train-labels-idx1-ubyte.gz", (1,)), ("t10k-images-idx3-ubyte.gz", (1, 28, 28)),
                       ("t10k-labels-idx1-ubyte.gz", (1,))):
        (folder / name).write_bytes(gzip.compress(idx_header(*dims) + bytes(int(np.prod(dims)))))
    return folder


def cifar_archive(root: Path, member: str, size: int) -> Path:
    """cifar-10-binary.tar.gz holding one member of `size` zero bytes (a tar header, then the zeros)."""
    info = tarfile.TarInfo(f"cifar-10-batches-bin/{member}")
    info.size = size
    body = -(-size // 512) * 512 + 1024  # the member's blocks, then the end of the archive
    folder = root / "cifar"
    folder.mkdir()
    (folder / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(info.tobuf()) + zeros_gzip(body))
    return folder


def cifar_extracted(root: Path, big: str, size: int) -> Path:
    """An extracted cifar-10-batches-bin/ whose `big` file is sparse, `size` bytes long."""
    folder = root / "cifar" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        with open(folder / name, "wb") as f:
            f.truncate(size if name == big else 0)
    return folder.parent


# ---------------------------------------------------------------------------------------------
# Memory cases: what a missing bound would allocate is over LIMIT

def deep_toml(root: Path) -> Path:
    path = root / "deep.toml"
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    return path


MEMORY_CASES = {
    # name: (make(tmp) -> argv, needles)
    "arch of 12 blocks": (lambda tmp: ["train", *TINY, "--arch", ",".join(["1x8"] * 12), "--input-size", "8192"],
                          ["a training step of 12 blocks", "input 8192x8192", "more than"]),
    "arch of 40 blocks": (lambda tmp: ["train", *TINY, "--arch", ",".join(["1x8"] * 40)],
                          ["the architecture has 40 blocks", "2^40", "use at most"]),
    "arch of 5,000 blocks": (lambda tmp: ["train", *TINY, "--arch", ",".join(["1x8"] * 5000)],
                             ["the architecture has 5,000 blocks", "use at most"]),
    "input size 20000, adaptive head": (lambda tmp: ["train", *TINY, "--input-size", "20000", "--head-pool", "adaptive"],
                                        ["input 20000x20000", "more than"]),
    "input size 10^8": (lambda tmp: ["train", *TINY, "--input-size", "100000000"],
                        ["input size 100000000: one image of it needs", "use an input size below"]),
    "crop padding 100,000": (lambda tmp: ["train", *TINY, "--crop-padding", "100000"],
                             ["crop padding 100,000 is larger than the 28x28 training images", "use at most 28"]),
    "fc width 46,340": (lambda tmp: ["train", *TINY, "--fc-width", "46340"], ["fc width 46340", "more than"]),
    "summary of a 2^40 input": (lambda tmp: ["summary", "--arch", ",".join(["1x8"] * 40), "--input-size", str(2**40)],
                                ["input size 1099511627776", "more than"]),
    "--config /dev/zero": (lambda tmp: ["train", *TINY, "--config", "/dev/zero"],
                           ["config file /dev/zero is a character device, not a regular file"]),
    "--config of 2 MiB": (lambda tmp: ["train", *TINY, "--config", str(large_toml(tmp))],
                          ["large.toml is larger than 1.0 MiB"]),
    "TOML nested 100,000 deep": (lambda tmp: ["train", *TINY, "--config", deep_toml(tmp)],
                                 ["nests arrays or tables too deeply"]),
    "IDX header claiming 3e9 images": (
        lambda tmp: ["train", *TINY, "--data", "fashion-mnist", "--data-dir", fashion_mnist_dir(
            tmp, gzip.compress(idx_header(3_000_000_000, 28, 28)) + zeros_gzip(BOMB))],
        ["its header says 3,000,000,000x28x28, but Fashion-MNIST's 60,000 train images are 60,000x28x28"]),
    "IDX gzip bomb after the data": (
        lambda tmp: ["train", *TINY, "--data", "fashion-mnist", "--data-dir", fashion_mnist_dir(
            tmp, gzip.compress(idx_header(60_000, 28, 28)) + zeros_gzip(BOMB))],
        ["has more than 1,048,576 bytes after its data"]),
    "CIFAR member of 3 GB": (
        lambda tmp: ["train", *TINY, "--data", "cifar10", "--data-dir", cifar_archive(tmp, "data_batch_1.bin", BOMB)],
        ["member cifar-10-batches-bin/data_batch_1.bin is 3,221,225,472 bytes",
         "more than CIFAR-10's 50,000 train records of 3,073 bytes"]),
    "CIFAR archive of 3 GB beside its members": (
        lambda tmp: ["train", *TINY, "--data", "cifar10", "--data-dir", cifar_archive(tmp, "readme.html", BOMB)],
        ["holds more than the", "bytes its members can fill (decompressed)"]),
    "extracted CIFAR file of 3 GB": (
        lambda tmp: ["train", *TINY, "--data", "cifar10", "--data-dir", cifar_extracted(tmp, "data_batch_1.bin", BOMB)],
        ["data_batch_1.bin is 3,221,225,472 bytes", "more than CIFAR-10's 50,000 train records"]),
}


def large_toml(tmp) -> Path:
    """A TOML file of 2 MiB (a comment): read whole, it would be parsed whole."""
    path = tmp / "large.toml"
    path.write_bytes(b"#" * (2 << 20))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", MEMORY_CASES)
def test_sizes_from_outside_are_refused_before_memory_is_taken(tmp_path, case):
    make, needles = MEMORY_CASES[case]
    argv = [str(a) for a in make(tmp_path)]
    if argv[0] == "train":
        argv += ["--out", tmp_path / "runs"]
    before = snapshot(tmp_path)
    done = limited(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    one_line(done.stderr, *needles)
    assert snapshot(tmp_path) == before and done.stdout == ""


# ---------------------------------------------------------------------------------------------
# The same bounds, in process: TOML values by type, sizes in a file, the limit named

SHAPE = ["--arch", "1x8", "--input-size", "28"]


@pytest.mark.slow
@pytest.mark.parametrize("toml, flags, needles", [
    ("epochs = true\n", [*SHAPE, "--epochs", "2"], ["config file", "epochs must be an integer, got true (bool)"]),
    ("input_size = 1e9\n", SHAPE, ["input_size must be an integer, got 1000000000.0"]),
    ("input_size = 1000000000\n", ["--arch", "1x8"], ["input size 1000000000: one image of it needs"]),
    ("crop_padding = 100000\n", SHAPE, ["crop padding 100,000 is larger than the 28x28 training images"]),
    ('arch = "64x15000"\n', ["--input-size", "28"], ["a training step of 64x15000", "more than"]),
    ("preset = 5\n", SHAPE, ["unknown preset 5"]),
])
def test_toml_values_are_checked_even_where_a_flag_wins(tmp_path, capsys, toml, flags, needles):
    config = tmp_path / "my.toml"
    config.write_text(toml)
    tiny = [a for i, a in enumerate(TINY) if a not in ("--arch", "1x8", "--input-size", "28")]
    before = snapshot(tmp_path)
    code = main(["train", *tiny, *flags, "--config", str(config), "--out", str(tmp_path / "runs")])
    assert code == 2
    one_line(capsys.readouterr().err, *needles)
    assert snapshot(tmp_path) == before


def test_a_toml_file_read_is_capped(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * bounds.MAX_CONFIG_BYTES + "\nepochs = 1\n")
    with pytest.raises(VggkitError, match="larger than 1.0 MiB"):
        resolve_config(file=path)
    path.write_text("# a comment\nepochs = 3\n")
    assert resolve_config(file=path).epochs == 3


def test_the_limit_is_the_least_of_the_machine_and_the_process(monkeypatch):
    limit = bounds.memory_limit()
    assert limit.bytes > 0 and limit.what
    monkeypatch.setattr(bounds, "_rlimits", lambda: [bounds.Limit(1 << 30, "a 1 GiB test limit")])
    assert bounds.memory_limit() == bounds.Limit(1 << 30, "a 1 GiB test limit")
    with pytest.raises(VggkitError, match=r"needs ~2.0 GiB, more than a 1 GiB test limit; do less"):
        bounds.check_fits(2 << 30, "this", "do less")
    bounds.check_fits(1 << 30, "this", "do less")


def test_estimates_come_from_the_cost_report_without_allocating():
    network = dict(arch="1x8", in_channels=1, num_classes=10, input_size=28, fc_width=16, batch_norm=False)
    one, eight = bounds.training_memory(network, 1, "sgd", "float32"), bounds.training_memory(network, 8, "sgd", "float32")
    assert 0 < one < eight
    # 1x8 at 28x28: the weights, and per image the widest step, the 8x28x28 conv output to the 8x14x14 pool
    params = 8 * 9 + 8 + 8 * 14 * 14 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert bounds.inference_memory(network, 2) == 4 * params + 2 * 4 * (8 * 28 * 28 + 8 * 14 * 14)
    huge = dict(network, input_size=20_000, head_pool="adaptive")
    assert bounds.inference_memory(huge, 1) > 10 << 30  # meta device: computed, never held


def test_an_idx_file_is_read_no_further_than_its_header_allows(tmp_path):
    from vggkit.data import IdxFormat, read_idx

    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_header(2, 3, 3) + bytes(range(18))))
    assert read_idx(path, shape=(2, 3, 3)).tolist() == np.arange(18).reshape(2, 3, 3).tolist()
    with pytest.raises(VggkitError, match=r"its header says 2x3x3, but MNIST's train images are 5x3x3"):
        read_idx(path, shape=(5, 3, 3), what="MNIST's train images")
    path.write_bytes(gzip.compress(idx_header(2, 3, 3) + bytes(18)) + zeros_gzip(8 << 20))
    with pytest.raises(VggkitError, match="has more than 1,048,576 bytes after its data"):
        read_idx(path)
    assert IdxFormat("MNIST").counts == (60_000, 10_000) and IdxFormat("MNIST").side == 28


# ---------------------------------------------------------------------------------------------
# stdout closed (`>&-`): a command whose results go there refuses at once; train and export run

def closed_stdout(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VGGKIT_DEBUG"}
    return subprocess.run([sys.executable, "-m", "vggkit", *map(str, argv)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=cwd, env=env, timeout=300,
                          preexec_fn=lambda: os.close(1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch
    from PIL import Image

    from vggkit.checkpoint import save_checkpoint
    from vggkit.model import VGG

    root = tmp_path_factory.mktemp("closed")
    torch.manual_seed(0)
    model = VGG("1x8", in_channels=1, num_classes=3, input_size=12, fc_width=8)
    save_checkpoint(root / "ckpt", model, {"classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25], "input_size": 12})
    Image.new("L", (12, 12)).save(root / "x.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("argv, command", [
    (["summary", "--arch", "1x8", "--input-size", "28"], "summary"),
    (["predict", "{root}/ckpt", "{root}/x.png", "--compile", "off"], "predict"),
])
def test_results_for_a_closed_stdout_are_refused_at_once(checkpoint, argv, command):
    before = snapshot(checkpoint)
    done = closed_stdout(*[a.format(root=checkpoint) for a in argv], cwd=checkpoint)
    assert done.returncode == 2
    one_line(done.stderr, f"stdout is closed, and `vggkit {command}` writes its results there")
    assert snapshot(checkpoint) == before


@pytest.mark.slow
def test_files_are_made_with_stdout_closed(checkpoint, tmp_path):
    done = closed_stdout("predict", checkpoint / "ckpt", checkpoint / "x.png", "--compile", "off",
                         "--csv", tmp_path / "p.csv", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "" and (tmp_path / "p.csv").read_text().startswith("path,")
    done = closed_stdout("export", checkpoint / "ckpt", "--format", "torchscript", "--out", tmp_path / "m.pt",
                         cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "" and (tmp_path / "m.pt").is_file()
    done = closed_stdout("train", *TINY, "--out", tmp_path / "runs", "--name", "r", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "r" / "checkpoints" / "best" / "model.safetensors").is_file()
