"""Multi-process training: 2 processes on this machine (gloo over the loopback interface, rendezvous
through files: nothing listens on a network port), checked against 1 process."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vggkit import distributed as vd
from vggkit.checkpoint import load_model
from vggkit.cli import train_flag
from vggkit.errors import VggkitError
from vggkit.train import train

VGGKIT = [sys.executable, "-m", "vggkit"]
# no batch norm here: torch's own float32 CPU batch norm differs from the float64 reference by ~1e-4
# per step, which 16 steps amplify past 1e-5 (a single process with 1 vs 2 threads differs as much);
# batch norm over ranks has its own exact test below
SMALL = dict(arch="1x8,1x16", input_size=28, fc_width=32, batch_norm=False, dropout=0.0, init="xavier", epochs=2,
             batch_size=100, lr=0.05, limit=801, test_limit=300, val_size=200, drop_last=False, precision="fp32",
             flip=True, crop_padding=2, erasing=0.5, label_smoothing=0.1, allow_sample=False)


def flags(config: dict) -> list[str]:
    out = []
    for key, value in config.items():
        flag = train_flag(key)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def weights(run_dir: Path, which="last") -> dict:
    return load_file(str(run_dir / "checkpoints" / which / "model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- unit


def test_single_process_is_untouched(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert vd.init_from_env() is False and vd.world() == (0, 1)
    assert not torch.distributed.is_initialized()
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    loss, loss_sum = vd.batch_loss(logits, y, 6, 0.1)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1))
    assert vd.from_main(lambda: 42) == 42
    assert vd.run_rank(lambda: 7) == 7

    def fails():
        raise RuntimeError("gloo: Connection reset by peer")
    with pytest.raises(RuntimeError, match="gloo"):  # not swallowed in one process
        vd.run_rank(fails)


def test_batch_size_must_divide_and_the_error_says_what_would():
    vd.check_batch_size(100, 4)
    with pytest.raises(VggkitError) as e:
        vd.check_batch_size(100, 3)
    assert "--batch-size 99 or 102" in str(e.value) and "(2, 4, 5, 10, 20, 25)" in str(e.value)


def test_launcher_arguments_and_environment(monkeypatch):
    assert vd.strip_nproc(["train", "--nproc", "2", "--epochs", "1"]) == ["train", "--epochs", "1"]
    assert vd.strip_nproc(["train", "--nproc=4", "--name", "x", "--np", "3"]) == ["train", "--name", "x"]
    assert vd.strip_nproc(["train", "--name", "n", "--no-flip"]) == ["train", "--name", "n", "--no-flip"]
    monkeypatch.setenv("VGGKIT_DIST_TIMEOUT", "12.5")
    assert vd.timeout_seconds() == 12.5
    monkeypatch.setenv("VGGKIT_DIST_TIMEOUT", "soon")
    with pytest.raises(VggkitError, match="VGGKIT_DIST_TIMEOUT"):
        vd.timeout_seconds()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(VggkitError, match="leave --nproc out"):
        vd.launch(2, ["train", "--nproc", "2"])


def test_the_failed_rank_is_named_not_the_ones_torchrun_stopped():
    killed = {"rank": 1, "local_rank": 1, "pid": 11, "exitcode": -9, "timestamp": 5}
    stopped = {"rank": 0, "local_rank": 0, "pid": 10, "exitcode": -15, "timestamp": 5}
    lost = {"rank": 2, "local_rank": 2, "pid": 12, "exitcode": vd.LOST_PEER_EXIT, "timestamp": 4}
    crashed = {"rank": 3, "local_rank": 3, "pid": 13, "exitcode": 1, "timestamp": 5}
    assert vd.pick_root_failure({0: stopped, 1: killed, 2: lost})[0] == 1
    assert vd.pick_root_failure({0: stopped, 2: lost, 3: crashed})[0] == 3
    text = vd.describe_failure(killed, 2)
    assert text.startswith("rank 1 (pid 11) was killed by SIGKILL; the other rank was stopped")


# ---------------------------------------------------------------------------------------------- processes


def _launch(argv, tmp_path, **kwargs):
    env = {**os.environ, "VGGKIT_DIST_TIMEOUT": "30"}
    return subprocess.run(VGGKIT + argv, capture_output=True, text=True, env=env, cwd=tmp_path, **kwargs)


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(tmp_path, fmnist_dir):
    """Same global batch and seed: the weights after 2 epochs match 1 process to 1e-5, with flip, crop and
    erasing, label smoothing and an uneven last batch (801 images: the last global batch has 1 image, so
    rank 1's part is empty); the printed metrics are global (counts add up: no image twice or missing)."""
    config = {**SMALL, "data_dir": str(fmnist_dir), "out": str(tmp_path)}
    one = train({**config, "name": "one", "threads": 1}, progress="none", log=lambda *a: None)

    result = _launch(["train", "--nproc", "2", *flags({**config, "name": "two", "threads": 1})], tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    assert "2 processes" in result.stdout and result.stdout.count("epoch 2/2") == 1  # rank 0 speaks, once
    a, b = weights(one.run_dir), weights(two)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    for r1, r2 in zip(metrics(one.run_dir), metrics(two), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
            assert abs(float(r1[key]) - float(r2[key])) < 1e-5, (key, r1, r2)
    events = [json.loads(line)["event"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert events == ["start", "epoch", "epoch", "end"]  # written by rank 0 only
    state = torch.load(two / "checkpoints/last/state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2 * 9


@pytest.mark.slow
def test_training_with_batch_norm_uses_the_global_batch_statistics(tmp_path, fmnist_dir):
    """One step with batch norm: the running statistics after it are those of the whole global batch
    (each rank's half would be off by ~1e-3); the weights agree to torch's float32 batch-norm error."""
    config = {**SMALL, "batch_norm": True, "limit": 100, "epochs": 1, "data_dir": str(fmnist_dir), "out": str(tmp_path)}
    one = train({**config, "name": "one", "threads": 1}, progress="none", log=lambda *a: None)
    result = _launch(["train", "--nproc", "2", *flags({**config, "name": "two", "threads": 1})], tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(one.run_dir), weights(tmp_path / "two")
    for key in a:
        limit = 2e-5 if "running" in key else 1e-4
        assert (a[key].double() - b[key].double()).abs().max().item() < limit, key


SYNC_BN_RANK = textwrap.dedent("""
    import os, sys, torch, torch.nn as nn
    from vggkit import distributed as vd
    rank, out = int(sys.argv[1]), sys.argv[2]
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", VGGKIT_DIST_INIT="file://" + out + "/store")
    assert vd.init_from_env() and vd.world() == (rank, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(memory_format=torch.channels_last)
    model = vd.convert_sync_batchnorm(model, torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 6, 6, generator=g) * 3 + 1, torch.randint(0, 3, (12,), generator=g)
    part = slice(0, 7) if rank == 0 else slice(7, 12)  # uneven on purpose
    logits = ddp(x[part].contiguous(memory_format=torch.channels_last))
    loss, loss_sum = vd.batch_loss(logits, y[part], 12)
    loss.backward()
    torch.save({"logits": logits.detach(), "grads": {k: p.grad for k, p in model.named_parameters()},
                "buffers": {k: b for k, b in model.named_buffers()}}, f"{out}/rank{rank}.pt")
    os._exit(0)  # see vggkit.distributed.run_rank
""")


@pytest.mark.slow
def test_batch_norm_statistics_and_gradients_cover_the_global_batch(tmp_path):
    """CpuSyncBatchNorm in DDP on 2 ranks (7 + 5 images) = plain batch norm over all 12 images in float64."""
    script = tmp_path / "rank.py"
    script.write_text(SYNC_BN_RANK)
    env = {**os.environ, "VGGKIT_DIST_TIMEOUT": "30", "GLOO_SOCKET_IFNAME": vd.loopback_interface() or ""}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path)], env=env, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 6, 6, generator=g) * 3 + 1, torch.randint(0, 3, (12,), generator=g)
    logits = ref(x.double())
    torch.nn.functional.cross_entropy(logits, y).backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.allclose(torch.cat([r["logits"] for r in ranks]).double(), logits, atol=1e-5)
    for name, p in ref.named_parameters():
        for r in ranks:  # DDP left the same averaged gradient on both ranks
            assert torch.allclose(r["grads"][name].double(), p.grad, atol=1e-6), name
    for name, b in ref.named_buffers():
        for r in ranks:
            assert torch.allclose(r["buffers"][name].double(), b.double(), atol=1e-6), name


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _rank_pids(pid: int) -> dict[int, int]:
    ranks = {}
    for child in _descendants(pid):
        try:
            env = dict(item.split("=", 1) for item in Path(f"/proc/{child}/environ").read_text().split("\0")
                       if "=" in item)
        except OSError:
            continue
        if "LOCAL_RANK" in env and "RANK" in env:
            ranks[int(env["RANK"])] = child
    return ranks


def _start_long_run(tmp_path, fmnist_dir, name):
    config = dict(arch="1x16,1x32", input_size=28, fc_width=64, batch_norm=True, epochs=30, batch_size=64, limit=3200,
                  val_size=200, test_limit=200, precision="fp32", threads=1, allow_sample=False,
                  data_dir=str(fmnist_dir), out=str(tmp_path), name=name)
    env = {**os.environ, "VGGKIT_DIST_TIMEOUT": "30"}
    proc = subprocess.Popen(VGGKIT + ["train", "--nproc", "2", *flags(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    run = tmp_path / name
    deadline = time.monotonic() + 90
    while not (run / "checkpoints" / "last" / "state.pt").is_file():  # after epoch 1
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 90 s"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    return proc, run


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_stops_the_job_with_a_message_naming_it(tmp_path, fmnist_dir):
    proc, run = _start_long_run(tmp_path, fmnist_dir, "killed")
    ranks = _rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    out, err = proc.communicate(timeout=90)
    assert time.monotonic() - killed < 60
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"vggkit: error: rank 1 (pid {ranks[1]}) was killed by SIGKILL"), err[-3000:]
    assert f"The last checkpoint is intact: continue with vggkit train --resume {run}" in last
    assert "Traceback" not in err
    for pid in ranks.values():  # no rank left behind
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

    model, meta = load_model(run / "checkpoints" / "last")  # rank 0's last checkpoint loads
    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert meta["epoch"] >= 1 and state["world_size"] == 2 and state["batch"] == 0
    # and the run continues in one process (another number of processes than it was started with)
    history = train({"epochs": state["epoch"], "threads": 2}, resume=run, progress="none", log=lambda *a: None)
    assert history.epochs[-1]["epoch"] == state["epoch"] and 0.1 < history.test_acc <= 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigint_stops_all_ranks_at_the_same_step_and_the_run_resumes_with_two(tmp_path, fmnist_dir):
    proc, run = _start_long_run(tmp_path, fmnist_dir, "interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-3000:]
    assert f"resume with: vggkit train --resume {run}" in out and "Traceback" not in err
    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["world_size"] == 2
    epoch = state["epoch"]
    result = _launch(["train", "--resume", str(run), "--nproc", "2", "--epochs", str(epoch)], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {run} at epoch {epoch}, batch {state['batch']}" in result.stdout
    assert f"epoch {epoch}/{epoch}" in result.stdout


@pytest.mark.slow
def test_launch_reports_user_errors_once_before_starting(tmp_path):
    result = _launch(["train", "--nproc", "3", "--batch-size", "100"], tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vggkit: error: batch size 100 (the global batch, split across processes) does not divide by 3 processes; "
        "use --batch-size 99 or 102, or a number of processes that divides 100 (2, 4, 5, 10, 20, 25)"]
