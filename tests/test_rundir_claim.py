"""Claiming a run directory (rundir.py, issue 13): --name must be a plain name, --overwrite replaces
only a vggkit run and nothing beside it, bad data writes no run, one training at a time holds the
run's lock (a killed one's lock is taken at once), and the run's files follow the umask.

Every case asserts the exit code and the one-line message and that nothing outside the run was
touched. Trainings are tiny (helpers.tiny: the bundled sample, a 1x8 network).
"""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import (QUIET, STEPS_PER_EPOCH, TINY_FLAGS, assert_checkpoints_sound, cli, events, one_line, snapshot,
                     tiny, vggkit_command)
from vggkit.checkpoint import load_model
from vggkit.rundir import MARKER
from vggkit.train import train


# ---------------------------------------------------------------------------------------------- --name, --overwrite

@pytest.mark.parametrize("name", [".", "..", "../x", "/abs", "a/b"])
def test_a_run_name_must_be_plain_and_nothing_is_written(tmp_path, capsys, name):
    out = tmp_path / "runs"
    (out / "other-run").mkdir(parents=True)
    (out / "other-run" / "config.toml").write_text("another run")
    before = snapshot(tmp_path)
    code, err = cli(capsys, "train", *TINY_FLAGS, "--out", out, "--name", name, "--overwrite")
    assert code == 2 and f"--name {name!r} is not a plain name" in one_line(err)
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    precious = tmp_path / "runs" / "precious"
    precious.mkdir(parents=True)
    (precious / "thesis.txt").write_text("three years of work")
    before = snapshot(tmp_path)
    code, err = cli(capsys, "train", *TINY_FLAGS, "--out", tmp_path / "runs", "--name", "precious", "--overwrite")
    assert code == 2 and "is not a vggkit run" in one_line(err) and "choose another --name" in err
    assert snapshot(tmp_path) == before


def test_bad_data_writes_no_new_run_and_deletes_no_old_one(tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = cli(capsys, "train", *TINY_FLAGS, "--out", out, "--name", "new", "--data", tmp_path / "missing")
    assert code == 2 and "missing" in one_line(err) and not out.exists()

    old = train(tiny(out, "old"), **QUIET).run_dir
    before = snapshot(tmp_path)
    code, err = cli(capsys, "train", *TINY_FLAGS, "--out", out, "--name", "old", "--overwrite",
                    "--data", tmp_path / "missing")
    assert code == 2 and "missing" in one_line(err)
    assert snapshot(tmp_path) == before and len(assert_checkpoints_sound(old)) == 2


@pytest.mark.slow
def test_overwrite_replaces_a_run_and_only_it(tmp_path, capsys):
    out = tmp_path / "runs"
    old = train(tiny(out, "old"), **QUIET).run_dir
    (out / "beside.txt").write_text("keep")
    before = snapshot(tmp_path, leave_out=old)
    code, err = cli(capsys, "train", *TINY_FLAGS, "--out", out, "--name", "old", "--overwrite", "--quiet",
                    "--epochs", "2")
    assert code == 0, err
    assert snapshot(tmp_path, leave_out=old) == before and (old / MARKER).is_file()
    assert [e["event"] for e in events(old)] == ["start", "epoch", "epoch", "end"]  # the old run's are gone
    assert load_model(old / "checkpoints" / "last")[1]["epoch"] == 2 and len(assert_checkpoints_sound(old)) == 2


# ---------------------------------------------------------------------------------------------- the lock

WAITING_TRAINER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vggkit.train import train

    config, go, at_step = {config!r}, Path({go!r}), {at_step}

    def wait(step):
        if step == at_step:
            print("ready", flush=True)
            while not go.exists():
                time.sleep(0.05)

    train(config, resume={resume!r}, progress="none", log=lambda *a, **k: None, on_step=wait)
""")


def start_trainer(tmp_path, config: dict, at_step: int, resume=None) -> subprocess.Popen:
    """A training in another process that stops at `at_step` (holding the run) until tmp_path/go exists."""
    script = WAITING_TRAINER.format(config=config, go=str(tmp_path / "go"), at_step=at_step, resume=resume)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
def test_a_second_training_is_refused_while_the_first_completes(tmp_path, capsys):
    first = start_trainer(tmp_path, tiny(tmp_path, epochs=2), at_step=STEPS_PER_EPOCH + 1)  # after a checkpoint
    try:
        run = tmp_path / "run"
        in_use = f"{run} is in use: process {first.pid} is training there"
        second = vggkit_command("train", *TINY_FLAGS, "--out", tmp_path, "--name", "run", "--overwrite")
        assert second.returncode == 2 and in_use in one_line(second.stderr)
        for attempt in (["--out", tmp_path, "--name", "run"], ["--resume", run]):  # from this process
            code, err = cli(capsys, "train", *TINY_FLAGS, *attempt)
            assert code == 2 and in_use in one_line(err)
        (tmp_path / "go").touch()
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert [e["event"] for e in events(run)] == ["start", "epoch", "epoch", "end"]
    assert len(assert_checkpoints_sound(run)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("then", ["resume", "overwrite"])
def test_after_a_sigkill_a_new_training_takes_the_run_at_once(tmp_path, capsys, then):
    victim = start_trainer(tmp_path, tiny(tmp_path, epochs=2), at_step=STEPS_PER_EPOCH + 1)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    run = tmp_path / "run"
    assert (run / ".lock").read_text().strip() == str(victim.pid)  # the file stays; the kernel dropped the lock
    if then == "resume":
        code, err = cli(capsys, "train", "--resume", run, "--quiet")
    else:
        code, err = cli(capsys, "train", *TINY_FLAGS, "--out", tmp_path, "--name", "run", "--overwrite", "--quiet")
    assert code == 0, err
    assert len(assert_checkpoints_sound(run)) == 2


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_run_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        run = train(tiny(tmp_path), **QUIET).run_dir
    finally:
        os.umask(previous)
    modes = {p.relative_to(run): p.stat().st_mode & 0o777 for p in [run, *run.rglob("*")]}
    assert {p: m for p, m in modes.items() if m != (dir_mode if (run / p).is_dir() else file_mode)} == {}
    assert Path("checkpoints/last/state.pt") in modes and Path("curves.png") in modes
