"""--threads above the cores this process may use is capped at them, with a one-line note: before,
`--threads 64` on 2 cores trained no epoch in 300 s (threads taking turns on the cores)."""
import os

import pytest
import torch

from vggkit.cli import main
from vggkit.runtime import usable_cores, usable_threads

TINY_FLAGS = ["--arch", "1x8", "--fc-width", "16", "--input-size", "28", "--limit", "200", "--test-limit", "100",
              "--val-size", "100", "--batch-size", "50", "--epochs", "1", "--precision", "fp32",
              "--data", "fashion-mnist-sample"]


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


@pytest.mark.parametrize("asked, used, noted", [(1, 1, False), (2, 2, False), (3, 2, True), (64, 2, True),
                                                (999, 2, True)])
def test_threads_are_capped_at_the_cores(two_cores, asked, used, noted):
    notes = []
    assert usable_threads(asked, notes.append) == used
    expected = [f"note: --threads {asked} is more than the 2 cores this process may use; using 2"] if noted else []
    assert notes == expected


def test_usable_cores_are_the_affinity(two_cores):
    assert usable_cores() == 2


@pytest.mark.parametrize("threads", ["64", "999"])
def test_training_with_too_many_threads_runs_on_the_cores(two_cores, tmp_path, capsys, threads):
    before = torch.get_num_threads()
    code = main(["train", *TINY_FLAGS, "--threads", threads, "--out", str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"note: --threads {threads} is more than the 2 cores this process may use; using 2"
    assert sum("note: --threads" in line for line in lines) == 1
    assert any(line.startswith("device: cpu (") and ", 2 threads, " in line for line in lines)
    assert torch.get_num_threads() == before  # train() puts the process's setting back
