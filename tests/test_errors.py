"""Never a traceback: every bad input or failing machine ends in one line and an exit code.

2 for what the user can fix (bad numbers, types, paths), 1 for the machine (full disk) or an
internal error; --debug / VGGKIT_DEBUG=1 let the traceback through."""
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vggkit import cli
from vggkit.checkpoint import load_model, save_checkpoint
from vggkit.cli import main
from vggkit.config import TrainConfig, load_config, resolve_config, save_config, validate
from vggkit.errors import STDOUT, VggkitError, user_message
from vggkit.model import VGG
from vggkit.preprocess import Preprocess

CLASSES = [f"c{i}" for i in range(10)]
META = {"classes": CLASSES, "mean": [0.5], "std": [0.25], "input_size": 28, "dataset": "fashion-mnist"}
# a few seconds of work when a test must get as far as writing: the bundled sample, a tiny network
TINY_RUN = ["--data", "fashion-mnist-sample", "--arch", "1x8", "--input-size", "28", "--fc-width", "16",
            "--limit", "200", "--test-limit", "100", "--val-size", "100", "--batch-size", "50",
            "--precision", "fp32", "--threads", "2", "--quiet"]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("VGGKIT_DEBUG", raising=False)  # these tests are about what users see


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, code: int, expected_code: int, *needles: str, prefix="vggkit: error:"):
    assert code == expected_code, err
    assert err.startswith(prefix) and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def tiny_model(**changes):
    torch.manual_seed(0)
    return VGG(**{**dict(arch="1x8", in_channels=1, num_classes=10, input_size=28, fc_width=16), **changes})


# ---------------------------------------------------------------------------------------------
# Numbers and types, from flags: refused before anything is written

@pytest.mark.parametrize("argv,needle", [
    (["--threads", "-1"], "threads must be positive, got -1"),
    (["--threads", "0"], "threads must be positive, got 0"),  # 0 was silently ignored: now refused
    (["--threads", "100000"], "threads must be at most 1024"),
    (["--seed", "1" * 24], "seed must be in [0, 2**64 - 1]"),
    (["--seed", "-1"], "seed must be in [0, 2**64 - 1]"),
    (["--arch", "1x99999999999999999999"], "block 1 is 1x99999999999999999999: a block may have at most"),
    (["--arch", "1000x8"], "at most 64 convolutions"),
    (["--lr", "inf"], "--lr: expected a positive number"),
    (["--lr", "nan"], "--lr: expected a positive number"),
    (["--momentum", "nan"], "momentum must be a finite number, got nan"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number"),
    (["--erasing=-inf"], "erasing must be a finite number"),
    (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    (["--warmup", "1"], "warmup must be in [0, 1)"),
    (["--epochs", "-3"], "epochs must be positive, got -3"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--crop-padding", "-1"], "crop_padding must be 0 or more"),
    (["--val-size", "-5"], "val_size must be 0 or more"),
    (["--limit", "0"], "limit must be positive, got 0; e.g. --limit 1000 (or leave it out: every image)"),
])
def test_train_flags_out_of_range(tmp_path, capsys, argv, needle):
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "runs", *argv)
    assert_one_line(err, code, 2, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "1x99999999999999999999"], "block 1 is 1x9999"),
    (["--arch", "1x60000", "--input-size", "28"], "the first dense layer would have 48,168,960,000 weights"),
    (["--arch", "1x64", "--input-size", "28", "--fc-width", "9999999999"], "dense layer would have"),
    (["--arch", "2x30000", "--input-size", "32"], "convolution 2 of block 1 would have 8,100,000,000 weights"),
    (["--arch", "1x8", "--input-size", "28", "--num-classes", "999999999"], "the output layer would have"),
])
def test_summary_refuses_absurd_layers(capsys, argv, needle):
    code, out, err = run_cli(capsys, "summary", *argv)
    assert_one_line(err, code, 2, needle)
    assert out == ""


# ---------------------------------------------------------------------------------------------
# ... from a TOML file (a field of the wrong type, a non-finite number), and the file itself

@pytest.mark.parametrize("toml,needle", [
    ('threads = "2"', 'threads must be an integer, got "2" (str); e.g. threads = 4'),
    ('seed = "x"', 'seed must be an integer, got "x" (str); e.g. seed = 0'),
    ('val_size = "a"', 'val_size must be an integer, got "a" (str)'),
    ("data_dir = 5", "data_dir must be a string, got 5 (int)"),
    ('flip = "yes"', 'flip must be true or false, got "yes" (str); e.g. flip = true'),
    ("epochs = true", "epochs must be an integer, got true (bool)"),
    ("epochs = 2.5", "epochs must be an integer, got 2.5 (float)"),
    ("lr = inf", "lr must be a finite number, got inf"),
    ("lr = nan", "lr must be a finite number, got nan"),
    ("momentum = -inf", "momentum must be a finite number"),
    ("momentum = 1.5", "momentum must be in [0, 1)"),
    ("threads = 0", "threads must be positive, got 0"),
    ('arch = "1x99999999999999999999"', "at most 65,536 channels"),
    ("bogus = 1", "unknown config key 'bogus'"),
    ("preset = [1]", "unknown preset [1]; choose one of fast"),
    ("train = 5", "train must be a table"),
])
def test_config_file_values_are_checked(tmp_path, capsys, toml, needle):
    config = tmp_path / "config.toml"
    config.write_text(toml + "\n")
    code, out, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "runs")
    assert_one_line(err, code, 2, needle)
    assert not (tmp_path / "runs").exists()


def test_config_file_that_is_a_folder_or_not_utf8(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", tmp_path, "--out", tmp_path / "runs")
    assert_one_line(err, code, 2, f"config file {tmp_path} is a folder")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    code, _, err = run_cli(capsys, "train", "--config", latin1, "--out", tmp_path / "runs")
    assert_one_line(err, code, 2, "is not UTF-8 text (byte 11); save it as UTF-8")
    assert not (tmp_path / "runs").exists()


def test_valid_values_pass_and_ints_are_numbers():
    config = resolve_config(overrides={"lr": 1, "threads": 3, "seed": 2**64 - 1, "val_size": 0})
    validate(config)
    assert config.lr == 1 and config.seed == 2**64 - 1
    for bad in ({"lr": True}, {"batch_norm": 1}, {"data_dir": 5}, {"epochs": "8"}):
        with pytest.raises(VggkitError, match=next(iter(bad))):
            resolve_config(overrides=bad)


# ---------------------------------------------------------------------------------------------
# A run's saved config.toml, damaged: refused on resume, and not rewritten

@pytest.mark.parametrize("change,needle", [
    (lambda text: text.replace("epochs = 8", 'epochs = "abc"'), "epochs must be an integer"),
    (lambda text: text.replace("lr = 0.1", "lr = nan"), "lr must be a finite number"),
    (lambda text: "\n".join(l for l in text.splitlines() if not l.startswith("arch")), "no 'arch' key"),
    (lambda text: text + "bogus = 3\n", "unknown key 'bogus'"),
    (lambda text: text.replace("[train]", "").replace("lr = 0.1", "lr = [1, 2"), "not valid TOML"),
])
def test_damaged_run_config_is_refused(tmp_path, capsys, change, needle):
    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(epochs=8, batch_size=256, input_size=28, flip=True, val_size=5000, lr=0.1), run / "config.toml")
    (run / "config.toml").write_text(change((run / "config.toml").read_text()))
    before = (run / "config.toml").read_bytes()
    with pytest.raises(VggkitError, match=needle):
        load_config(run / "config.toml")
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert_one_line(err, code, 2, needle, "config.toml")
    assert (run / "config.toml").read_bytes() == before
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# --out that cannot be used: a file, under /proc, immutable

def test_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "not-a-folder"
    out.write_text("precious")
    code, _, err = run_cli(capsys, "train", "--out", out, "--name", "r", *TINY_RUN)
    assert_one_line(err, code, 2, str(out))
    assert out.read_text() == "precious"


def test_out_under_proc(capsys):
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    code, _, err = run_cli(capsys, "train", "--out", "/proc/vggkit-test/runs", "--name", "r", *TINY_RUN)
    assert_one_line(err, code, 2, "/proc/vggkit-test")


def test_out_that_cannot_be_written(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", locked], capture_output=True).returncode == 0:
        unlock = ["chattr", "-i", locked]  # immutable: even root cannot create files in it
    elif os.geteuid() != 0:
        locked.chmod(0o555)
        unlock = ["chmod", "755", locked]
    else:
        pytest.skip("running as root without chattr: no folder here is unwritable")
    try:
        code, _, err = run_cli(capsys, "train", "--out", locked, "--name", "r", *TINY_RUN)
    finally:
        subprocess.run(unlock, check=True)
    assert_one_line(err, code, 1, f"cannot use {locked / 'r'}", "permission")  # the machine refuses: exit 1
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The one place: exceptions from the outside world and from vggkit itself

@pytest.mark.parametrize("error,code,needles", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.jsonl"), 1,
     ["no space left on device writing /runs/r/metrics.jsonl", "free space", "previous checkpoint is intact"]),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 1,  # safetensors
     ["no space left on device:", "previous checkpoint is intact"]),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 1,  # torch.save
     ["no space left on device (or a write failed)"]),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/runs"), 1,
     ["cannot use /srv/runs: permission denied; check its permissions"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), 1, ["cannot use /mnt/ro/x: read-only file system"]),
    (OSError(errno.EPERM, "Operation not permitted", "/x"), 1, ["cannot use /x: operation not permitted", "chattr"]),
    (OSError(errno.ENOENT, "No such file or directory", "/no/x"), 2, ["cannot use /no/x: no such file or directory"]),
    (OSError(errno.ENOSPC, "No space left on device", STDOUT), 1,
     ["vggkit: error: cannot write to the standard output: no space left on device"]),
    (OSError(errno.EIO, "Input/output error", "/dev/sdz"), 1, ["vggkit: error: /dev/sdz: input/output error"]),
    (OSError(errno.EIO, "Input/output error"), 1, ["vggkit: error: input/output error"]),
    (ValueError("a library\nsaid no"), 1, ["vggkit: error: a library said no"]),
    (MemoryError(), 1, ["out of memory", "--batch-size"]),
    (VggkitError("bad\ninput"), 2, ["vggkit: error: bad input"]),
    (KeyError("x"), 1, ["vggkit: internal error: KeyError: 'x' (run with --debug or VGGKIT_DEBUG=1"]),
])
def test_user_message(error, code, needles):
    line, got = user_message(error)
    assert got == code and "\n" not in line
    for needle in needles:
        assert needle in line


def boom(args):
    raise ZeroDivisionError("the bug")


def test_internal_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_summary", boom)
    code, out, err = run_cli(capsys, "summary")
    assert_one_line(err, code, 1, "ZeroDivisionError: the bug", "--debug", prefix="vggkit: internal error:")
    for argv in (["--debug", "summary"], ["summary", "--debug"]):
        with pytest.raises(ZeroDivisionError):
            main(argv)
    monkeypatch.setenv("VGGKIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["summary"])


def test_warnings_become_one_line_notes(monkeypatch, capsys):
    import warnings

    def warn(args):
        warnings.warn("something\nlong", UserWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_summary", warn)
    code, _, err = run_cli(capsys, "summary")
    assert code == 0 and err == "vggkit: note: something long\n"


@pytest.mark.slow
def test_broken_pipe_is_quiet(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "vggkit", "summary", "--json", "--per-layer", "--arch", "vgg19"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.SIGPIPE_EXIT and err == ""


# ---------------------------------------------------------------------------------------------
# Full disk: on a small tmpfs (needs a mount namespace: root or user namespaces)

def mount_namespace(tmp_path) -> list[str]:
    """unshare's arguments for a shell that may mount a tmpfs (root, or user namespaces), else skip."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) to mount a small tmpfs")
    reasons = []
    for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return unshare
        reasons.append(probe.stderr.strip())
    pytest.skip(f"cannot mount a tmpfs here: {'; '.join(reasons)}")


CHECK_CHECKPOINTS = textwrap.dedent("""
    import pathlib, sys, torch
    from vggkit.checkpoint import load_model
    run = pathlib.Path(sys.argv[1])
    found = sorted(d for d in (run / "checkpoints").iterdir() if (d / "model.safetensors").is_file())
    for d in found:
        model, _ = load_model(d)
        assert all(torch.isfinite(p).all() for p in model.parameters()), d
    print("checkpoints", *[d.name for d in found])
""")


@pytest.mark.slow
def test_disk_full_is_one_line_exit_1_and_keeps_the_checkpoints(tmp_path):
    unshare = mount_namespace(tmp_path)
    (tmp_path / "check.py").write_text(CHECK_CHECKPOINTS)
    disk = tmp_path / "disk"
    disk.mkdir()
    # fc-width 64: ~400 kB of weights. Epoch 1 writes last (weights + optimizer state) and best:
    # ~1.2 MB; epoch 2's new last does not fit beside them in 1.4 MB.
    train = [sys.executable, "-m", "vggkit", "train", "--out", str(disk), "--name", "r", *TINY_RUN,
             "--epochs", "3", "--fc-width", "64"]
    script = (f"mount -t tmpfs -o size=1400k tmpfs {disk} && "
              f"{' '.join(train)} 2> {tmp_path / 'err'}; echo $? > {tmp_path / 'rc'}; "
              f"{sys.executable} {tmp_path / 'check.py'} {disk / 'r'}")
    done = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=300)
    err = (tmp_path / "err").read_text()
    assert_one_line(err, int((tmp_path / "rc").read_text()), 1, "no space left on device", "previous checkpoint is intact")
    assert done.returncode == 0 and "checkpoints best last" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# Checkpoints whose metadata is damaged, foreign or absurd (load_model, then the CLI)

def write_weights(path, model_meta, *, raw=None, model=None):
    model = model or tiny_model()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    text = raw if raw is not None else json.dumps({"model": model_meta, **META})
    save_file(tensors, str(path), metadata={"vggkit": text})
    return path


def good_model_meta():
    return tiny_model().config()


@pytest.mark.parametrize("model_meta,needle", [
    ({**good_model_meta(), "colour": "blue"}, "unknown model argument 'colour'; VGG takes arch"),
    ({**good_model_meta(), "fc_width": 48_000}, "the second dense layer would have 2,304,000,000 weights (8.58 GiB"),
    ({**good_model_meta(), "arch": "1x99999999999999999999"}, "at most 65,536 channels"),
    ({**good_model_meta(), "dropout": "half"}, "dropout must be in [0, 1)"),
    ({**good_model_meta(), "batch_norm": "no"}, "batch_norm must be True or False"),
    ({**good_model_meta(), "input_size": [28]}, "input size must be a positive integer or a (height, width) pair"),
    ({**good_model_meta(), "in_channels": True}, "in_channels must be a positive integer"),
    ({**good_model_meta(), "init": ["x"]}, "unknown init ['x']"),
])
def test_load_model_refuses_bad_model_arguments(tmp_path, capsys, model_meta, needle):
    weights = write_weights(tmp_path / "model.safetensors", model_meta)
    with pytest.raises(VggkitError) as info:
        load_model(weights)
    assert needle in str(info.value)
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    code, out, err = run_cli(capsys, "predict", weights, image)
    assert_one_line(err, code, 2, needle)


def test_vgg_from_config_names_what_is_missing():
    config = good_model_meta()
    assert VGG.from_config(config).config() == config
    with pytest.raises(VggkitError, match="has no fc_width, batch_norm"):
        VGG.from_config({k: v for k, v in config.items() if k not in ("fc_width", "batch_norm")})
    with pytest.raises(VggkitError, match="must be a table"):
        VGG.from_config([1, 2])


@pytest.mark.parametrize("raw,needle", [
    ("{not json", "metadata"),
    (json.dumps(META), "model"),
    (json.dumps({"model": {k: v for k, v in good_model_meta().items() if k != "fc_width"}, **META}), "fc_width"),
])
def test_load_model_refuses_damaged_metadata(tmp_path, raw, needle):
    weights = write_weights(tmp_path / "model.safetensors", None, raw=raw)
    with pytest.raises(VggkitError) as info:
        load_model(weights)
    assert needle in str(info.value) and str(weights) in str(info.value)


# ---------------------------------------------------------------------------------------------
# predict: images too large for Pillow, warnings, metadata that does not fit

@pytest.fixture
def run(tmp_path):
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last", tiny_model(), META)
    return tmp_path / "run"


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, run, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    bomb, large = tmp_path / "bomb.png", tmp_path / "large.png"
    Image.new("L", (100, 100)).save(bomb)  # 10,000 pixels: over twice the limit, an error
    Image.new("L", (30, 50)).save(large)  # 1,500: over the limit, a warning
    code, out, err = run_cli(capsys, "predict", run, bomb)
    assert_one_line(err, code, 2, f"image {bomb} is too large to open safely")
    assert out == ""
    code, out, err = run_cli(capsys, "predict", run, large)
    assert code == 0 and out.startswith(f"{large}: ")
    assert err.startswith(f"vggkit: note: {large}: Image size (1500 pixels) exceeds limit") and err.count("\n") == 1


def test_channel_statistics_that_do_not_fit_say_so_truly(tmp_path, capsys):
    with pytest.raises(VggkitError, match=r"mean has 3 values for 1-channel images; it takes 1 value$"):
        Preprocess(28, [0.1, 0.2, 0.3], [1.0], channels=1)
    with pytest.raises(VggkitError, match=r"std has 2 values for 3-channel images; it takes 1 or 3 values$"):
        Preprocess(28, [0.1], [1.0, 2.0], channels=3)
    from vggkit.features import FeatureExtractor
    with pytest.raises(VggkitError, match=r"mean and std need 1 value \(one per input channel\)"):
        FeatureExtractor(tiny_model(), ["block1"], mean=[0.1, 0.2, 0.3], std=[1.0])
    save_checkpoint(tmp_path / "c", tiny_model(), {**META, "mean": [0.1, 0.2, 0.3]})
    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    code, _, err = run_cli(capsys, "predict", tmp_path / "c", tmp_path / "x.png")
    assert_one_line(err, code, 2, "mean has 3 values for 1-channel images")
    assert "1 or 1" not in err


def test_no_training_images_is_not_a_val_size_problem(monkeypatch):
    import vggkit.data.load as load
    from vggkit.data.dataset import Dataset

    empty = Dataset(np.zeros((0, 28, 28, 1), np.uint8), np.zeros(0, np.int64), CLASSES)
    monkeypatch.setattr(load, "load_sample", lambda: (empty, empty))
    for val_size in (0, 10):
        with pytest.raises(VggkitError, match="has no training images") as info:
            load.load_data("fashion-mnist-sample", val_size=val_size, log=lambda *a: None)
        assert "val_size" not in str(info.value)
