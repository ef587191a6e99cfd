"""Imbalanced classes (balance.py): the rule decide() applies and the note on the `data:` line, the
class-weighted loss, class-balanced sampling (a pure function of seed and epoch, split across ranks as
the plain order is), --balance in the run's config and on resume, and what `vggkit evaluate` then says."""
import json
import tomllib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vggkit.balance import AUTO_REMEDY, IMBALANCE_RATIO, class_weights, imbalance, sample_weights
from vggkit.cli import main
from vggkit.config import TrainConfig
from vggkit.data import Dataset
from vggkit.decide import DataFacts, decide
from vggkit.distributed import batch_loss
from vggkit.errors import VggkitError
from vggkit.pipeline import BatchLoader, epoch_order
from vggkit.rundir import RunDir


def facts(*counts) -> DataFacts:
    return DataFacts("folder", sum(counts), 0, 14, 14, known=False, flips_safe=False, class_counts=counts)


def test_the_rule():
    assert imbalance([60, 20]) == (60, 20) and imbalance([59, 20]) is None  # 3:1 or more
    assert imbalance([100, 0, 90]) is None  # a class without images is not the smallest
    assert imbalance([7]) is None and imbalance(()) is None


@pytest.mark.parametrize("counts, given, balance, note", [
    ((400, 400, 20), "auto", AUTO_REMEDY, "classes imbalanced: 400 to 20 images per class, 20.0:1 (3:1 or more)"),
    ((400, 400, 20), "off", "off", "no balancing (--balance off)"),
    ((400, 400, 20), "sampling", "sampling", "class-balanced sampling (--balance sampling)"),
    ((100, 60, 90), "auto", "off", None),
    ((100, 60, 90), "weights", "weights", "class-weighted loss (--balance weights)"),
])
def test_decided_from_the_data(counts, given, balance, note):
    config, notes = decide(TrainConfig(balance=given, precision="fp32"), facts(*counts))
    assert config.balance == balance
    assert (note in notes["balance"]) if note else "balance" not in notes


def test_class_weights_give_each_class_the_same_share():
    labels = np.array([0] * 30 + [1] * 6 + [2] * 0 + [3] * 4)
    weights = class_weights(labels, 4)
    assert weights[2] == 0 and float(weights[labels].mean()) == pytest.approx(1.0)  # the lr means what it did
    shares = [float(weights[c] * (labels == c).sum()) for c in (0, 1, 3)]
    assert shares == pytest.approx([shares[0]] * 3)


def test_weighted_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 3, requires_grad=True), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    plain, plain_sum = batch_loss(logits, y, 8, 0.1)
    even, even_sum = batch_loss(logits, y, 8, 0.1, torch.ones(3))
    assert torch.allclose(even, plain) and torch.allclose(even_sum, plain_sum)  # weights of 1: the plain loss
    weights = torch.tensor([0.5, 2.0, 4.0])
    loss, loss_sum = batch_loss(logits, y, 8, 0.1, weights)
    per_image = F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
    assert torch.allclose(loss, (per_image * weights[y]).sum() / 8)
    assert torch.allclose(loss_sum, per_image.sum())  # the figures stay the plain loss


def test_sampling_draws_classes_evenly_and_is_a_function_of_seed_and_epoch():
    labels = np.array([0] * 950 + [1] * 50)
    draw = sample_weights(labels, 2)
    first = epoch_order(1000, 7, 3, True, draw)
    assert torch.equal(first, epoch_order(1000, 7, 3, True, draw))  # resume makes the same order again
    assert not torch.equal(first, epoch_order(1000, 7, 4, True, draw))
    assert 0.4 < (labels[first.numpy()] == 1).mean() < 0.6  # the rare class drawn about half the time


def test_sampled_batches_resume_and_ranks_split_the_same_order():
    labels = np.array([0] * 40 + [1] * 8)
    data = Dataset(np.arange(48, dtype=np.uint8).reshape(48, 1, 1, 1).repeat(4, 1).repeat(4, 2), labels, ["a", "b"])
    options = dict(shuffle=True, seed=3, input_size=4, draw=sample_weights(labels, 2))
    whole = BatchLoader(data, 8, **options)
    whole.set_epoch(2)
    batches = [x for x, _ in whole]  # the images hold their index: which images, in which order
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in whole.iter_from(3)], batches[3:], strict=True))
    assert sum(len(x) for x in batches) == 48 and len({float(v) for x in batches for v in x.flatten()}) < 48
    ranks = [BatchLoader(data, 8, rank=r, world_size=2, **options) for r in (0, 1)]
    for loader in ranks:
        loader.set_epoch(2)
    assert all(torch.equal(torch.cat([a, b]), x) for (a, _), (b, _), x in zip(*ranks, batches, strict=True))


def drawn(root, counts, size=10, seed=0):
    """A folder of class sub-folders, counts[c] images of class c: a bright row whose place tells the class."""
    rng = np.random.default_rng(seed)
    for c, count in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 60, (size, size), dtype=np.uint8)
            image[2 + 3 * c] = 230
            Image.fromarray(image).save(root / f"class{c}" / f"{i}.png")
    return root


FLAGS = ["--arch", "1x4", "--fc-width", "8", "--epochs", "1", "--precision", "fp32", "--device", "cpu",
         "--threads", "1", "--val-size", "0", "--batch-size", "8", "--compile", "off", "--kernels", "plain"]


def train_cli(capsys, folder, out, name, *flags):
    assert main(["train", "--data", str(folder), "--out", str(out), "--name", name, *FLAGS, *flags]) == 0
    data_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data:"))
    return data_line, tomllib.loads((out / name / "config.toml").read_text())["train"]


@pytest.mark.slow
def test_an_imbalanced_folder_end_to_end(tmp_path, capsys):
    folder = drawn(tmp_path / "skewed", (36, 36, 6))  # 6:1
    line, saved = train_cli(capsys, folder, tmp_path, "auto")
    assert "classes imbalanced: " in line and "(--balance off for none)" in line
    assert saved["balance"] == AUTO_REMEDY  # what auto decided, kept for resume
    with pytest.raises(VggkitError, match="drop the balance option"):
        RunDir(tmp_path / "auto").resumed_config({"balance": "off"})

    line, saved = train_cli(capsys, folder, tmp_path, "off", "--balance", "off")
    assert "no balancing (--balance off)" in line and saved["balance"] == "off"

    assert main(["evaluate", str(tmp_path / "auto")]) == 0
    report = capsys.readouterr().out
    assert "macro F1 " in report and "balanced accuracy " in report and "expected calibration error" in report
    assert main(["evaluate", str(tmp_path / "auto"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"macro_f1", "weighted_f1", "balanced_acc", "ece", "per_class_metrics"} <= set(result)
    evaluation = tmp_path / "auto" / "checkpoints" / "best" / "evaluation"
    assert (evaluation / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert (evaluation / "per_class.csv").is_file() and (evaluation / "metrics.json").is_file()


@pytest.mark.slow
def test_a_balanced_folder_says_nothing_about_balance(tmp_path, capsys):
    line, saved = train_cli(capsys, drawn(tmp_path / "even", (20, 20, 12)), tmp_path / "runs", "even")
    assert "imbalanced" not in line and "balanc" not in line and saved["balance"] == "off"
    assert 20 / 12 < IMBALANCE_RATIO


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["weights", "sampling"])
def test_two_processes_balance_exactly_like_one(tmp_path, balance):
    """With either remedy, 2 processes (gloo, as tests/test_distributed.py) end with the weights of 1: the
    weighted loss is scaled by the global batch, the sampled order is the same on every rank."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from vggkit.train import train

    folder = drawn(tmp_path / "skewed", (40, 40, 8), size=12)
    config = dict(data=str(folder), arch="1x4", fc_width=8, batch_norm=False, epochs=2, batch_size=16, lr=0.05,
                  val_size=0, precision="fp32", device="cpu", threads=1, compile="off", kernels="plain",
                  balance=balance, out=str(tmp_path), drop_last=False)
    one = train({**config, "name": "one"}, progress="none", log=lambda *a: None)
    flags = [arg for key, value in config.items() for arg in ("--" + key.replace("_", "-"), str(value))
             if not isinstance(value, bool)] + ["--no-drop-last", "--no-batch-norm", "--name", "two", "--nproc", "2"]
    done = subprocess.run([sys.executable, "-m", "vggkit", "train", *flags], capture_output=True, text=True,
                          env={**os.environ, "VGGKIT_DIST_TIMEOUT": "30"}, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
            for run in (one.run_dir, tmp_path / "two"))
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-5


def test_streamed_photos_are_drawn_as_the_in_memory_images_are(tmp_path):
    """The streamed path (stream.StreamLoader, FileDataset) takes the same sampled order, split across
    ranks and resumed mid-epoch as the plain order is."""
    from vggkit.data import load_data
    from vggkit.data.prepared import prepare_datasets
    from vggkit.preprocess import CENTER
    from vggkit.stream import StreamLoader

    rng = np.random.default_rng(0)
    for c, count in enumerate((12, 12, 3)):
        (tmp_path / "photos" / f"class{c}").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / f"class{c}" / f"{i}.png")
    splits = load_data(str(tmp_path / "photos"), val_size=0, streaming="on", log=lambda *a, **k: None)
    train_set = prepare_datasets({"train": splits.train}, (18, 18), skip_bad=False)["train"]
    draw = sample_weights(train_set.labels, 3)

    def batches(rank=0, world_size=1, start=0):
        loader = StreamLoader(train_set, 6, shuffle=True, seed=5, draw=draw, rank=rank, world_size=world_size,
                              input_size=16, crop=CENTER)
        loader.set_epoch(2)
        return list(loader.iter_from(start))

    alone = batches()
    order = epoch_order(len(train_set), 5, 2, True, draw)
    assert torch.equal(torch.cat([y for _, y in alone]), torch.as_tensor(train_set.labels)[order])
    for (x, y), ((x0, y0), (x1, y1)) in zip(alone, zip(batches(0, 2), batches(1, 2)), strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(alone[2:], batches(start=2), strict=True))
