"""One validation of a checkpoint, used by every loader (issue 27, items 5, 9, 10 and 11):
evaluate, predict, export and --init (checkpoint.check_checkpoint through load_model), --resume
(check_weights and check_training_state), and standard-layout weights for --init (convert.py).

Each damaged file is made here from a tiny network, and every case asserts exit code 2, the one
line naming the file and what is wrong, and that nothing was written. Metadata that would make a
loader build gigabytes (fc_width 46,340, arch 64x15000, an adaptive head at 100,000x100,000) runs
in a subprocess under RLIMIT_AS, so that a regression fails the test instead of the machine.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vggkit.checkpoint import EMA_PREFIX, check_training_state, load_model, save_checkpoint
from vggkit.cli import main
from vggkit.convert import to_standard
from vggkit.errors import VggkitError
from vggkit.model import VGG
from vggkit.train import train

LIMIT = 2 << 30
CLASSES = [f"c{i}" for i in range(10)]
META = {"classes": CLASSES, "mean": [0.5], "std": [0.25], "input_size": 28, "dataset": "fashion-mnist"}
TINY = ["--data", "fashion-mnist-sample", "--input-size", "28", "--limit", "200", "--test-limit", "100",
        "--val-size", "100", "--batch-size", "50", "--epochs", "1", "--precision", "fp32", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("VGGKIT_DEBUG", raising=False)


def tiny_model(**changes) -> VGG:
    torch.manual_seed(0)
    return VGG(**{**dict(arch="1x8", in_channels=1, num_classes=10, input_size=28, fc_width=16, batch_norm=True),
                  **changes})


def write_checkpoint(directory: Path, meta_change=None, tensor_change=None, raw_meta: str | None = None) -> Path:
    """A checkpoint directory of tiny_model() (with averaged weights), its metadata and tensors changed."""
    model = tiny_model()
    save_checkpoint(directory, model, META)
    weights = directory / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads(f.metadata()["vggkit"])
    tensors = load_file(str(weights))
    tensors |= {EMA_PREFIX + k: v.clone() for k, v in tensors.items()}
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensors = tensor_change(tensors)
    save_file(tensors, str(weights), metadata={"vggkit": raw_meta if raw_meta is not None else json.dumps(meta)})
    return directory


def snapshot(root: Path) -> dict:
    """Every path under root with its contents: what "nothing written" compares."""
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def one_line(err: str, *needles: str) -> str:
    assert err.count("\n") == 1 and err.startswith("vggkit: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def model_change(**changes):
    return lambda meta: meta["model"].update(changes)


def nested(depth: int) -> str:
    return json.dumps({"model": tiny_model().config(), **META})[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"


# name: (metadata change, tensor change, raw metadata, needles)
DAMAGED = {
    "NaN mean": (lambda m: m.update(mean=[float("nan")]), None, None,
                 ["mean must be finite numbers (one per input channel), got [nan]"]),
    "std a string": (lambda m: m.update(std="x"), None, None,
                     ["std must be finite numbers (one per input channel), got 'x'"]),
    "std zero": (lambda m: m.update(std=[0.0]), None, None, ["std must be positive, got [0.0]"]),
    "std of 3 values, 1 channel": (lambda m: m.update(std=[1.0, 1.0, 1.0]), None, None,
                                   ["std has 3 values for 1-channel images"]),
    "1 class name for 10 outputs": (lambda m: m.update(classes=["a"]), None, None,
                                    ["classes must be a list of 10 names", "got ['a']"]),
    "classes not a list": (lambda m: m.update(classes="abcdefghij"), None, None,
                           ["classes must be a list of 10 names", "got 'abcdefghij'"]),
    "input_size 1e9": (lambda m: m.update(input_size=1e9), None, None,
                       ["input_size must be a positive integer or a [height, width] pair, got 1000000000.0"]),
    "input_size not the network's": (lambda m: m.update(input_size=32), None, None,
                                     ["input_size 32 is not the network's 28x28"]),
    "image_size [-5, 0]": (lambda m: m.update(image_size=[-5, 0]), None, None,
                           ["image_size must be a positive integer or a [height, width] pair, got [-5, 0]"]),
    "image_size of 10^10 pixels": (lambda m: m.update(image_size=[100_000, 100_000]), None, None,
                                   ["image_size 100000x100000 is more pixels than any image vggkit reads"]),
    "JSON nested 100,000 deep": (None, None, nested(100_000), ["JSON nested too deeply"]),
    "model not a table": (lambda m: m.update(model=[1, 2]), None, None, ["incomplete vggkit metadata"]),
    "bool weights": (None, lambda t: {k: v != 0 for k, v in t.items()}, None,
                     ["features.0.0.weight holds BOOL values, not floating point"]),
    "int64 weights": (None, lambda t: {k: v.long() for k, v in t.items()}, None,
                      ["features.0.0.weight holds I64 values, not floating point"]),
    "a tensor missing": (None, lambda t: {k: v for k, v in t.items() if k != "classifier.7.bias"}, None,
                         ["describes a network of 13 tensors (1 convolutions), the file holds 12"]),
    "a tensor of another shape": (None, lambda t: t | {"classifier.7.bias": torch.zeros(11)}, None,
                                  ["classifier.7.bias is 11 in the file, 10 in the network its metadata describes"]),
    "averaged weights of another shape": (None, lambda t: t | {EMA_PREFIX + "classifier.7.weight": torch.zeros(10, 17)},
                                          None, ["averaged classifier.7.weight is 10x17 in the file, 10x16"]),
    "an unexpected averaged tensor": (None, lambda t: t | {EMA_PREFIX + "extra": torch.zeros(1)}, None,
                                      ["(an unexpected averaged extra)"]),
}
# What a missing bound would build: gigabytes. Run under RLIMIT_AS.
HUGE = {
    "fc_width 46,340": (model_change(fc_width=46340), None, None,
                        ["classifier.1.weight is 16x1568 in the file, 46340x1568 in the network"]),
    "arch 64x15000": (model_change(arch="64x15000"), None, None,
                      ["describes a network of 454 tensors (64 convolutions), the file holds 13"]),
    "adaptive head at 100,000x100,000": (
        lambda m: (m["model"].update(input_size=[100_000, 100_000], head_pool="adaptive", arch="1x8"),
                   m.update(input_size=100_000)),
        lambda t: t | {k: torch.zeros(16, 8 * 49) for k in ("classifier.1.weight", EMA_PREFIX + "classifier.1.weight")},
        None, ["inference on 1 image of 100000x100000 needs", "more than"]),
}
LOADERS = {
    "predict": lambda ckpt, tmp: ["predict", ckpt, tmp / "x.png", "--compile", "off", "--csv", tmp / "out.csv"],
    "evaluate": lambda ckpt, tmp: ["evaluate", ckpt, "--data", tmp / "images", "--compile", "off", "--out", tmp / "ev"],
    "export": lambda ckpt, tmp: ["export", ckpt, "--format", "torchscript", "--out", tmp / "model.pt"],
    "--init": lambda ckpt, tmp: ["train", "--init", ckpt, *TINY, "--out", tmp / "runs", "--name", "r"],
}


def inputs(tmp: Path) -> None:
    Image.new("L", (28, 28)).save(tmp / "x.png")
    (tmp / "images" / "c0").mkdir(parents=True)
    Image.new("L", (28, 28)).save(tmp / "images" / "c0" / "a.png")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_checkpoints_are_refused_by_every_loader(tmp_path, capsys, case, loader):
    meta_change, tensor_change, raw, needles = DAMAGED[case]
    checkpoint = write_checkpoint(tmp_path / "ckpt", meta_change, tensor_change, raw)
    inputs(tmp_path)
    before = snapshot(tmp_path)
    code = main([str(a) for a in LOADERS[loader](checkpoint, tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2, err
    one_line(err, str(checkpoint / "model.safetensors"), *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", HUGE)
def test_metadata_describing_gigabytes_is_refused_before_building(tmp_path, case, loader):
    meta_change, tensor_change, raw, needles = HUGE[case]
    checkpoint = write_checkpoint(tmp_path / "ckpt", meta_change, tensor_change, raw)
    inputs(tmp_path)
    before = snapshot(tmp_path)
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT})); "
            "from vggkit.cli import main; sys.exit(main(sys.argv[1:]))")
    # no GPU: a CUDA context alone would reserve more address space than LIMIT
    env = {**{k: v for k, v in os.environ.items() if k != "VGGKIT_DEBUG"}, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code, *map(str, LOADERS[loader](checkpoint, tmp_path))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    one_line(done.stderr, str(checkpoint / "model.safetensors"), *needles)
    assert snapshot(tmp_path) == before


def test_a_sound_checkpoint_loads_with_every_key_filled_in(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", lambda m: [m.pop(k) for k in ("classes", "mean", "std")])
    model, meta = load_model(checkpoint)
    assert meta["classes"] == [str(i) for i in range(10)] and meta["mean"] == [0.0] and meta["std"] == [1.0]
    assert meta["input_size"] == 28 and meta["weights"] == "ema"
    with pytest.raises(VggkitError, match="not floating point"):
        load_model(write_checkpoint(tmp_path / "b", tensor_change=lambda t: {k: v.to(torch.uint8) for k, v in t.items()}))


# ---------------------------------------------------------------------------------------------
# --init from standard-layout weights: what a .pth file is, and weights that are not weights

def standard_file(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"a": 1}, f, protocol=4)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize("content, needles", [
    (os.urandom(2000), ["is not a PyTorch weights file: neither a zip archive (torch.save) nor a pickle"]),
    (b"PK\x03\x04" + bytes(500), ["cannot read weights from", "PytorchStreamReader failed reading zip archive"]),
    ("pickle", ["it is a pickle, but not one torch.save writes"]),
    ({k: v != 0 for k, v in to_standard(tiny_model()).items()}, ["features.0.weight holds bool values, not floating"]),
    ({k: v.long() for k, v in to_standard(tiny_model()).items()}, ["features.0.weight holds int64 values"]),
])
def test_init_from_a_file_that_holds_no_weights(tmp_path, capsys, content, needles):
    weights = standard_file(tmp_path / "weights.pth", content)
    before = snapshot(tmp_path)
    code = main(["train", "--init", str(weights), *TINY, "--out", str(tmp_path / "runs")])
    _, err = capsys.readouterr()
    assert code == 2
    one_line(err, str(weights), *needles)
    assert "--lr" not in err and snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# --resume: the last checkpoint's training state and weights

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    config = dict(data="fashion-mnist-sample", arch="1x8", fc_width=16, input_size=28, limit=200, test_limit=100,
                  val_size=100, batch_size=50, epochs=1, precision="fp32", threads=1, out=str(root), name="run")
    return train(config, progress="none", log=lambda *a, **k: None).run_dir


def damage_state(change):
    def damage(last: Path) -> None:
        state = torch.load(last / "state.pt", weights_only=True)
        torch.save(change(state), last / "state.pt")
    return damage


def damage_weights(change):
    def damage(last: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(last / "model.safetensors"), framework="pt") as f:
            metadata = f.metadata()
        save_file(change(load_file(str(last / "model.safetensors"))), str(last / "model.safetensors"), metadata)
    return damage


RESUMES = {
    "state a list": (damage_state(lambda s: [1, 2]), ["holds list, not the table of training state"]),
    "state without its epoch": (damage_state(lambda s: {k: v for k, v in s.items() if k != "epoch"}),
                                ["has no 'epoch'"]),
    "state epoch a string": (damage_state(lambda s: s | {"epoch": "2"}), ["has a 'epoch' of type str"]),
    "history nested 100,000 deep": (damage_state(lambda s: s | {"history": "[" * 100_000 + "]" * 100_000}),
                                    ["has a history that is not readable JSON"]),
    "history not a list of epochs": (damage_state(lambda s: s | {"history": '{"a": 1}'}),
                                     ["has a history that is not a list of epochs"]),
    "sums of 2 numbers": (damage_state(lambda s: s | {"sums": torch.zeros(2)}), ["out of range"]),
    "optimizer of another network": (damage_state(lambda s: s | {"optimizer": {"state": {}, "param_groups": []}}),
                                     ["does not fit this run's optimizer"]),
    "bool weights": (damage_weights(lambda t: {k: v != 0 for k, v in t.items()}), ["holds BOOL values"]),
    "a tensor of another shape": (damage_weights(lambda t: t | {"classifier.7.bias": torch.zeros(3)}),
                                  ["classifier.7.bias is 3 in the file, 10 in this run's network"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", RESUMES)
def test_resume_refuses_a_damaged_training_state(trained, tmp_path, capsys, case):
    damage, needles = RESUMES[case]
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "checkpoints" / "last")
    before = snapshot(tmp_path)
    code = main(["train", "--resume", str(run), "--epochs", "2", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2, err
    one_line(err, *needles)
    assert snapshot(tmp_path) == before


def test_a_sound_training_state_passes(trained):
    state = torch.load(trained / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert check_training_state(state, Path("state.pt")) is state
