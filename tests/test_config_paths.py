"""A run's config.toml stores its paths absolute (--data as an image folder, --data-dir, --init
naming a file or folder) and they mean the same files from any working directory: before,
`vggkit evaluate RUN` from another directory evaluated another folder at the same relative path
(exit 0), or failed with "no such folder", and so did --resume. Runs saved before, with relative
paths, keep working from the directory they were started in."""
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vggkit.cli import main

TINY_FLAGS = ["--arch", "1x8", "--fc-width", "16", "--batch-size", "8", "--epochs", "1", "--precision", "fp32",
              "--threads", "1", "--quiet"]


def image_folder(root: Path, per_class: int, seed: int) -> Path:
    """Two classes of 16x16 gray images (one dark, one light), per_class each."""
    rng = np.random.default_rng(seed)
    for label, level in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 20, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def saved(run: Path) -> dict:
    return tomllib.loads((run / "config.toml").read_text())["train"]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def started(tmp_path, monkeypatch, capsys) -> Path:
    """A run trained from tmp_path/start with relative paths: --data images, --out runs."""
    start = tmp_path / "start"
    image_folder(start / "images", per_class=10, seed=0)
    monkeypatch.chdir(start)
    code, _, err = run_cli(capsys, "train", "--data", "images", *TINY_FLAGS, "--out", "runs", "--name", "run")
    assert (code, err) == (0, "")
    return start / "runs" / "run"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Another working directory, holding another folder at the same relative path (`images`)."""
    other = tmp_path / "elsewhere"
    image_folder(other / "images", per_class=30, seed=1)
    monkeypatch.chdir(other)
    return other


@pytest.mark.slow
def test_the_saved_config_names_paths_absolute(tmp_path, monkeypatch, capsys):
    start = tmp_path / "start"
    image_folder(start / "images", per_class=10, seed=0)
    (start / "data").mkdir()
    monkeypatch.chdir(start)
    code, _, err = run_cli(capsys, "train", "--data", "images", "--data-dir", "data", *TINY_FLAGS,
                           "--out", "runs", "--name", "first")
    assert (code, err) == (0, "")
    code, _, err = run_cli(capsys, "train", "--data", "./images/../images", "--init", "runs/first", *TINY_FLAGS,
                           "--out", "runs", "--name", "second")
    assert (code, err) == (0, "")
    first, second = saved(start / "runs" / "first"), saved(start / "runs" / "second")
    assert (first["data"], first["data_dir"]) == (str(start / "images"), str(start / "data"))
    assert (second["data"], second["init_from"]) == (str(start / "images"), str(start / "runs" / "first"))
    with safe_open(str(start / "runs" / "first" / "checkpoints" / "best" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["vggkit"])["dataset"] == str(start / "images")


def test_named_datasets_and_standard_weights_stay_names(tmp_path, monkeypatch):
    from vggkit.config import TrainConfig, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(TrainConfig(data="fashion-mnist-sample", init_from="vgg16"))
    assert (config.data, config.data_dir, config.init_from) == ("fashion-mnist-sample", None, "vgg16")


@pytest.mark.slow
def test_evaluate_from_another_directory_evaluates_the_runs_folder(started, elsewhere, capsys):
    """Before: the other folder's 60 images ("accuracy ... (60 images)"), exit 0."""
    code, out, err = run_cli(capsys, "evaluate", started, "--json")
    assert (code, err.count("error")) == (0, 0)
    result = json.loads(out)
    assert result["count"] == 2  # the run's own held-out test split: 10% of 20 images
    assert result["split"] == "test"


@pytest.mark.slow
def test_resume_from_another_directory_trains_on_the_runs_folder(started, elsewhere, capsys):
    before = files(elsewhere)
    code, out, err = run_cli(capsys, "train", "--resume", started, "--epochs", "2")
    assert (code, err) == (0, "")
    data = next(line for line in out.splitlines() if line.startswith("vggkit: "))
    assert f"({started.parents[1] / 'images'} (image folder, 20 images, " in data  # not the 60 here
    events = [json.loads(line) for line in (started / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e.get("event") == "epoch"] == [1, 2]
    assert files(elsewhere) == before


def make_old(run: Path, data: str) -> None:
    """Make `run` look saved before paths were absolute: data relative in config.toml and in the weights."""
    config = run / "config.toml"
    config.write_text(config.read_text().replace(f'data = "{saved(run)["data"]}"', f'data = "{data}"'))
    for weights in run.glob("checkpoints/*/model.safetensors"):
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata()
        meta = json.loads(metadata["vggkit"])
        save_file(load_file(str(weights)), str(weights), metadata={**metadata, "vggkit": json.dumps(meta | {"dataset": data})})


@pytest.mark.slow
def test_a_run_saved_with_relative_paths_works_from_its_directory(started, capsys):
    make_old(started, "images")
    assert saved(started)["data"] == "images"
    code, out, err = run_cli(capsys, "evaluate", started, "--json")
    assert (code, json.loads(out)["count"]) == (0, 2)
    code, _, err = run_cli(capsys, "train", "--resume", started, "--epochs", "2", "--quiet")
    assert (code, err) == (0, "")
