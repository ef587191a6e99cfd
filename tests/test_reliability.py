"""Never lose a user's data, never save garbage (issue 13): the run directory, its lock, NaN-safe
checkpoints, validated resumes, stale temporaries, file modes and a full disk.

Every case asserts the exit code and the one-line message and, where files are involved, that
nothing outside the run was touched and that every checkpoint left behind loads and is finite.
Trainings are tiny (the bundled sample, a 1x8 network, a few hundred images): about a second each.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vggkit import errors
from vggkit.checkpoint import load_model, save_checkpoint
from vggkit.cli import main
from vggkit.model import VGG
from vggkit.rundir import MARKER
from vggkit.train import TrainingDiverged, train

SAMPLE = "fashion-mnist-sample"
TINY = dict(arch="1x8", fc_width=16, init="xavier", input_size=28, limit=200, test_limit=100, val_size=100,
            batch_size=50, epochs=1, lr=0.05, precision="fp32", threads=1, data=SAMPLE)
TINY_FLAGS = ["--arch", "1x8", "--fc-width", "16", "--init-scheme", "xavier", "--input-size", "28", "--limit", "200",
              "--test-limit", "100", "--val-size", "100", "--batch-size", "50", "--epochs", "1", "--lr", "0.05",
              "--precision", "fp32", "--threads", "1", "--data", SAMPLE]
STEPS_PER_EPOCH = 4  # 200 training images (validation comes on top), batches of 50
QUIET = dict(progress="none", log=lambda *a, **k: None)


def tiny(out, name="run", **changes) -> dict:
    return {**TINY, "out": str(out), "name": name, **changes}


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("vggkit: error: ") and "Traceback" not in err, err
    return err


def snapshot(root: Path, leave_out: Path | None = None) -> dict:
    """Every file and folder under root (but leave_out) with its mode and contents."""
    files = {}
    for path in sorted(root.rglob("*")):
        if leave_out is not None and (path == leave_out or leave_out in path.parents):
            continue
        files[path] = (path.stat().st_mode, path.read_bytes() if path.is_file() else None)
    return files


def checkpoints_in(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("model.safetensors"))


def assert_checkpoints_sound(root: Path) -> list[Path]:
    """Every checkpoint under root loads, has finite weights and gives finite outputs."""
    found = checkpoints_in(root)
    for directory in found:
        model, meta = load_model(directory)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
        assert torch.isfinite(model(torch.rand(2, 1, 28, 28))).all()
    return found


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def vggkit_command(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vggkit", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


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


# ---------------------------------------------------------------------------------------------- never save garbage

def test_a_huge_learning_rate_saves_nothing_and_the_suggested_command_works(tmp_path, capsys):
    command = ["train", *TINY_FLAGS, "--epochs", "2", "--val-size", "0", "--out", tmp_path, "--name", "nan",
               "--quiet"]
    code, err = cli(capsys, *command, "--lr", "1e30")
    assert code == 2 and "no checkpoint was saved" in one_line(err) and "kept" not in err
    assert checkpoints_in(tmp_path) == []
    suggested = re.search(r"the same command with (.*)$", err.strip()).group(1).split()
    assert suggested == ["--lr", "0.1", "--overwrite"]
    code, err = cli(capsys, *command, "--lr", "1e30", *suggested)  # the later --lr wins, as in a shell
    assert code == 0, err
    assert len(assert_checkpoints_sound(tmp_path)) == 2


@pytest.fixture
def model_of_the_run(monkeypatch):
    """The VGG the next train() builds (its weights are what the checkpoints save)."""
    built = []

    def capture(*args, **kwargs):
        built.append(VGG(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr("vggkit.model.VGG", capture)
    return built


def spoil(model_of_the_run, at_step: int, how):
    def on_step(step):
        if step == at_step:
            with torch.no_grad():
                how(model_of_the_run[-1])
    return on_step


def nan_weight(model):
    model.classifier[-1].weight.fill_(float("nan"))


def huge_but_finite_weights(model):  # outputs overflow to inf, the loss is NaN: the --lr 1e30 case
    for p in model.parameters():
        p.fill_(1e30)


@pytest.mark.parametrize("validation", [100, 0], ids=["validation-loss", "one-training-batch"])
@pytest.mark.parametrize("how", [nan_weight, huge_but_finite_weights])
def test_weights_spoiled_by_the_last_update_are_never_saved(tmp_path, model_of_the_run, validation, how):
    """The epoch's last update spoils the weights after the last loss check of the loop: the check
    before saving catches it, on the validation loss or (no validation, no test) on a training batch."""
    config = tiny(tmp_path, val_size=validation, eval_every_epoch_on_test=False, epochs=2)
    with pytest.raises(TrainingDiverged) as error:
        train(config, **QUIET, on_step=spoil(model_of_the_run, STEPS_PER_EPOCH, how))
    message = str(error.value)
    problem = "the weights became NaN or infinite" if how is nan_weight else "the loss of the current weights is nan"
    assert message.startswith(f"{problem} at epoch 1, step {STEPS_PER_EPOCH}") and "\n" not in message
    assert "no checkpoint was saved" in message and "--overwrite" in message
    assert checkpoints_in(tmp_path) == []
    train(config, overwrite=True, **QUIET)  # the next command the message suggests
    assert len(assert_checkpoints_sound(tmp_path)) == 2


def test_divergence_after_a_checkpoint_keeps_it_and_says_which(tmp_path, model_of_the_run):
    config = tiny(tmp_path, epochs=3)
    with pytest.raises(TrainingDiverged) as error:
        train(config, **QUIET, on_step=spoil(model_of_the_run, 2 * STEPS_PER_EPOCH, nan_weight))
    last = tmp_path / "run" / "checkpoints" / "last"
    assert f"at epoch 2, step {2 * STEPS_PER_EPOCH}" in str(error.value)
    assert f"the last good checkpoint {last} is kept" in str(error.value)
    assert load_model(last)[1]["epoch"] == 1 and len(assert_checkpoints_sound(tmp_path)) == 2


@pytest.mark.parametrize("command", [["evaluate", "--test-limit", "10"], ["predict", "IMAGE"],
                                     ["export", "--format", "torchscript"]])
def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(tmp_path, capsys, command):
    model = VGG("1x8", in_channels=1, input_size=28, fc_width=16)
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = float("inf")
    save_checkpoint(tmp_path / "nan", model, {"classes": [str(i) for i in range(10)], "mean": [0.0], "std": [1.0],
                                              "input_size": 28, "dataset": SAMPLE})
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("L", (28, 28)).save(image)
    name, *options = command
    code, err = cli(capsys, name, tmp_path / "nan", *[str(image) if o == "IMAGE" else o for o in options])
    assert code == 2 and "holds NaN or infinite weights (1 tensors, first classifier.1.weight)" in one_line(err)
    assert "train again with a lower --lr" in err and sorted(p.name for p in (tmp_path / "nan").iterdir()) == \
        ["model.safetensors"]


# ---------------------------------------------------------------------------------------------- resume, temporaries

def test_resume_with_an_invalid_epoch_count_changes_nothing(tmp_path, capsys):
    run = train(tiny(tmp_path), **QUIET).run_dir
    before = snapshot(tmp_path, leave_out=run / ".lock")
    code, err = cli(capsys, "train", "--resume", run, "--epochs", "-3")
    assert code == 2 and "epochs must be positive" in one_line(err)
    assert snapshot(tmp_path, leave_out=run / ".lock") == before and 'epochs = 1' in (run / "config.toml").read_text()


def test_stale_temporaries_of_a_killed_save_go_with_the_next_save(tmp_path):
    run = train(tiny(tmp_path), **QUIET).run_dir
    stale = [run / "checkpoints" / ".last.k1ll3d.tmp", run / "checkpoints" / ".best.k1ll3d.tmp"]
    for directory in stale:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
    train({"epochs": 2}, resume=run, **QUIET)
    assert not any(d.exists() for d in stale)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
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


# ---------------------------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp_path/disk (mounting needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_a_full_disk_keeps_the_previous_checkpoint(small_disk, capsys):
    run = train(tiny(small_disk), **QUIET).run_dir
    previous = load_model(run / "checkpoints" / "last")[0].state_dict()
    fill(small_disk, leave=48 * 1024)  # enough to resume, not for another checkpoint (~200 KB)
    with pytest.raises(Exception) as error:
        train({"epochs": 2}, resume=run, **QUIET)
    assert errors.VggkitError not in type(error.value).__mro__  # a failure of the machine, not of the input
    if hasattr(errors, "user_message"):  # the CLI's one place for such errors
        line, code = errors.user_message(error.value)
        assert code == 1 and "no space left on device" in line and "free space" in line
        assert "the previous checkpoint is intact" in line and "\n" not in line
    model, meta = load_model(run / "checkpoints" / "last")
    assert meta["epoch"] == 1 and all(torch.equal(model.state_dict()[k], v) for k, v in previous.items())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]  # no temporary left
    assert len(assert_checkpoints_sound(run)) == 2
    (small_disk / "filler").unlink()
    assert train({"epochs": 2}, resume=run, **QUIET).epochs[-1]["epoch"] == 2  # and the lock was let go
