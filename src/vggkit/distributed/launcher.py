"""`vggkit train --nproc N`: torchrun for one machine (`launch`), how a rank ends (`run_rank`), and
the one-line report naming the rank that failed first. Exit codes between ranks and launcher:
2 a vggkit error (already printed), 130 interrupted, LOST_PEER_EXIT a rank that lost its peers."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import torch.distributed as dist

from ..errors import VggkitError, debug_requested, user_message
from ..runtime import in_main_thread
from ..untrusted import printable
from .collectives import MainRankError, world
from .global_batch import check_batch_size

LOST_PEER_EXIT = 3  # a worker's exit code when it stopped because another rank was lost


# ---------------------------------------------------------------------------------------------
# How a rank of the CLI ends

def run_rank(work) -> int:
    """The CLI's train command around `work()` (which returns an exit code). In a single process it
    only returns work(). In a distributed run (work() joined the process group), the rank ends here:

    - an error is printed as one line as the CLI would (rank 0's error repeated on the other ranks,
      MainRankError, is left to rank 0); a collective that failed because another rank died or hung
      (connection closed, timeout) is said as "rank R lost contact with the other ranks" and exits
      with LOST_PEER_EXIT, so that the launcher names the rank that failed first;
    - the process leaves with os._exit after flushing its output: letting the interpreter finalize
      while gloo's worker threads still release tensors aborts the process at random ("terminate
      called without an active exception", pytorch/pytorch#190489), seen here in ~1 run in 10.
    """
    try:
        code = work()
    except BaseException as error:  # noqa: BLE001
        if world()[1] == 1:
            raise
        code = _rank_error(error)
    else:
        if world()[1] == 1:
            return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _rank_error(error: BaseException) -> int:
    rank = world()[0]
    if isinstance(error, MainRankError):
        return 2
    if isinstance(error, VggkitError):
        print(printable(f"vggkit: error: {error}"), file=sys.stderr)
        return 2
    if isinstance(error, KeyboardInterrupt):
        print("vggkit: interrupted", file=sys.stderr)
        return 130
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    if is_collective_failure(error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "] " in first:  # drop gloo's source location
            first = first.split("] ", 1)[1]
        first = first.split(". This is typically caused")[0]
        print(f"vggkit: error: rank {rank} lost contact with the other ranks ({first}); stopping", file=sys.stderr)
        return LOST_PEER_EXIT
    if debug_requested(sys.argv[1:]):
        import traceback
        traceback.print_exception(error, file=sys.stderr)
        return 1
    line, code = user_message(error)  # as the CLI says it in one process
    print(printable(line), file=sys.stderr)
    return code


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        needle in text for needle in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed",
                                      "Broken pipe", "Timed out", "timed out", "Socket Timeout"))


# ---------------------------------------------------------------------------------------------
# The launcher: torchrun's agent in a subprocess

_AGENT = ("import sys; from vggkit.distributed.launcher import _agent_main; sys.exit(_agent_main(sys.argv[1:]))")


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without --nproc N / --nproc=N (or an abbreviation argparse accepts, like --np 2)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = token.partition("=")
        if len(name) >= 4 and "--nproc".startswith(name):
            skip = not eq
            continue
        out.append(token)
    return out


def loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def _default_threads(nproc: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // nproc)


def launch(nproc: int, argv: list[str], config=None, resume: str | None = None) -> int:
    """Run `vggkit <argv without --nproc N>` in nproc processes on this machine through torchrun's
    agent (what `torchrun --nnodes 1 --nproc-per-node N -m vggkit ...` does) and return its exit code.

    The rendezvous goes through files in a temporary folder (nothing listens on a network port; gloo
    talks over the loopback interface). SIGINT/SIGTERM are passed on: the ranks save a checkpoint
    and stop together (exit code 130). When a rank fails, torchrun stops the others; this prints one
    line naming the failed rank and returns 1 (2 when the ranks stopped on a vggkit error).
    """
    if os.environ.get("TORCHELASTIC_RUN_ID") or "LOCAL_RANK" in os.environ:
        raise VggkitError("--nproc starts torchrun itself; under torchrun, leave --nproc out "
                          "(torchrun's --nproc-per-node sets the number of processes)")
    _check_global_batch(nproc, config, resume)
    workdir = tempfile.mkdtemp(prefix="vggkit-torchrun-")
    failure_file = os.path.join(workdir, "failure.json")
    run_dir_file = os.path.join(workdir, "run_dir")
    try:
        proc = subprocess.Popen([sys.executable, "-c", _AGENT, *_torchrun_args(nproc, workdir, argv)],
                                env=_agent_environment(nproc, workdir, failure_file, run_dir_file),
                                start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        code, received = _wait_forwarding_signals(proc)
    finally:
        failure = _read_json(failure_file)
        run_dir = _read_text(run_dir_file) or resume
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(code, failure, received, nproc, run_dir)


def _check_global_batch(nproc: int, config, resume: str | None) -> None:
    """The batch size must divide by nproc: said here once rather than by every rank."""
    batch_size = getattr(config, "batch_size", None)
    if batch_size is None and resume:
        try:
            from ..config import load_config
            from ..rundir import config_path
            batch_size = load_config(config_path(resume)).batch_size
        except (VggkitError, OSError):
            batch_size = None  # the ranks will say what is wrong with the run
    if batch_size is not None:
        check_batch_size(batch_size, nproc)


def _torchrun_args(nproc: int, workdir: str, argv: list[str]) -> list[str]:
    return ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", os.path.join(workdir, "rendezvous"), "--rdzv-conf", "store_type=file",
            "--rdzv-id", f"vggkit-{uuid.uuid4().hex[:12]}", "--local-addr", "127.0.0.1",
            "--max-restarts", "0", "-m", "vggkit", *strip_nproc(argv)]


def _agent_environment(nproc: int, workdir: str, failure_file: str, run_dir_file: str) -> dict:
    env = dict(os.environ)
    env.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", VGGKIT_DIST_INIT=f"file://{os.path.join(workdir, 'store')}",
               VGGKIT_FAILURE_FILE=failure_file, VGGKIT_RUN_DIR_FILE=run_dir_file)
    env.setdefault("OMP_NUM_THREADS", str(_default_threads(nproc)))
    env.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's agent: quiet (launch prints its own summary line)
    loopback = loopback_interface()
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    return env


def _wait_forwarding_signals(proc: subprocess.Popen) -> tuple[int, list[int]]:
    """(exit code of proc, the signals passed on to it): SIGINT/SIGTERM go to the agent until it exits."""
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {}
    if in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        while True:
            try:
                return proc.wait(), received
            except KeyboardInterrupt:  # only if a handler could not be installed
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_with_parent():  # in the child, before exec: SIGTERM when the launcher dies
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001  best effort
        pass


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _report(code: int, failure: dict | None, received: list[int], nproc: int, run_dir: str | None = None) -> int:
    """The launcher's exit code, printing one line on a failure."""
    if code == 0:
        return 0
    if received or (failure or {}).get("signal"):
        return 130  # interrupted: rank 0 has said where the checkpoint is
    root = (failure or {}).get("root")
    if root is None:
        print(f"vggkit: error: torchrun exited with code {code} before the {nproc} ranks ran "
              "(see the messages above)", file=sys.stderr)
        return code if code > 0 else 1
    if root["exitcode"] == 2:  # a vggkit error, already printed by the ranks
        return 2
    if root["exitcode"] == 130:
        return 130
    print(f"vggkit: error: {describe_failure(root, nproc, run_dir)}", file=sys.stderr)
    return 1


def describe_failure(root: dict, nproc: int, run_dir: str | None = None) -> str:
    code = root["exitcode"]
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    elif code == LOST_PEER_EXIT:
        how = "lost contact with the other ranks (a collective timed out: see VGGKIT_DIST_TIMEOUT)"
    else:
        how = f"exited with code {code}"
    others = f"the other {nproc - 1} ranks were" if nproc > 2 else "the other rank was"
    text = f"rank {root['rank']} (pid {root['pid']}) {how}; {others} stopped. "
    from ..rundir import has_resumable_checkpoint

    if run_dir and has_resumable_checkpoint(run_dir):
        return text + f"The last checkpoint is intact: continue with vggkit train --resume {run_dir} (any --nproc)"
    if run_dir:
        return text + f"No checkpoint was written yet in {run_dir}: start the run again"
    return text + "Checkpoints already written are intact: continue with vggkit train --resume RUN_DIR"


def pick_root_failure(failures: dict[int, dict]) -> tuple[int, dict]:
    """The failure that caused the others. torchrun stops the surviving ranks with SIGTERM, and a rank
    whose peer died exits with LOST_PEER_EXIT, so those come last: first a rank killed by another
    signal (SIGKILL, SIGSEGV, ...), then one that exited with an error; then the earliest, lowest rank."""
    def badness(item):
        rank, f = item
        code = f["exitcode"]
        order = 3 if code in (-signal.SIGTERM, -signal.SIGINT) else 2 if code == LOST_PEER_EXIT else 0 if code < 0 else 1
        return (order, f.get("timestamp", 0), rank)
    return min(failures.items(), key=badness)


def _agent_main(argv: list[str]) -> int:
    """torchrun's agent (torch.distributed.run.run) with its failures written as JSON for `launch`."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(os.environ.get("LOGLEVEL", "CRITICAL"))
    out = os.environ.get("VGGKIT_FAILURE_FILE")
    result: dict = {}
    code = 0
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        failures = {rank: {"rank": rank, "local_rank": f.local_rank, "pid": f.pid, "exitcode": f.exitcode,
                           "timestamp": f.timestamp, "host": socket.getfqdn()} for rank, f in e.failures.items()}
        rank, root = pick_root_failure(failures)
        result = {"root": root, "others": [f for r, f in failures.items() if r != rank]}
        code = 1
    except SignalException as e:
        result = {"signal": int(e.sigval)}
        code = 128 + int(e.sigval)
    except KeyboardInterrupt:
        result = {"signal": int(signal.SIGINT)}
        code = 130
    if out:
        try:
            with open(out, "w") as f:
                json.dump(result, f)
        except OSError:
            pass
    return code
