"""Multi-process training on torch.distributed (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK).

How a distributed run works (train.py calls these helpers; a single process never needs them):

- `init_from_env()` joins the process group torchrun describes (gloo on CPU; gloo for CPU tensors
  and NCCL for CUDA tensors on a GPU machine), with a collective timeout of $VGGKIT_DIST_TIMEOUT
  seconds (default 60), so a rank whose peer died stops instead of hanging.
- The global batch (--batch-size) is split across ranks by the BatchLoader; `batch_loss` weights
  each rank's loss so that DDP's gradient average equals the gradient of the mean loss over the
  global batch, also when the last batch of an epoch splits unevenly (or leaves a rank nothing).
- Batch norm statistics are computed over the global batch (`convert_sync_batchnorm`: torch's
  SyncBatchNorm on GPUs, `CpuSyncBatchNorm` below on CPUs, where torch's refuses to run).
- `from_main` runs a step on rank 0 only (choosing the run directory) and gives every rank its
  result; `agree_stop` makes all ranks stop at the same step when any of them got SIGINT/SIGTERM.
- `run_rank` ends a rank of the CLI: errors as one line (a rank that lost its peers says so,
  exit code 3), then os._exit (see there why).
- `launch(nproc, argv)` (`vggkit train --nproc N`) runs torchrun's agent for one machine in a
  subprocess, forwards SIGINT/SIGTERM to it and, when a rank fails, prints one line naming it.
"""
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
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import VggkitError
from .runtime import in_main_thread

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait for the other ranks
LOST_PEER_EXIT = 3  # a worker's exit code when it stopped because another rank was lost


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def timeout_seconds() -> float:
    """The collective timeout: $VGGKIT_DIST_TIMEOUT seconds, default 60."""
    text = os.environ.get("VGGKIT_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise VggkitError(f"VGGKIT_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


def init_from_env(device: torch.device | str | None = None) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched by it
    (a plain `python` or notebook process: WORLD_SIZE unset or 1) or when already joined.

    Backend: $VGGKIT_DIST_BACKEND if set, else gloo (CPU), or gloo for CPU tensors plus NCCL for
    CUDA tensors where CUDA is available. Rendezvous: torchrun's store (env://), or the file store
    in $VGGKIT_DIST_INIT (file://PATH) that `launch` uses so nothing listens on a network port.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = os.environ.get("VGGKIT_DIST_BACKEND")
    if not backend:
        kind = torch.device(device).type if device is not None else None
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        backend = "cpu:gloo,cuda:nccl" if cuda and kind in (None, "cuda") else "gloo"
    if "nccl" in backend and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % max(torch.cuda.device_count(), 1))
    kwargs = {}
    if os.environ.get("VGGKIT_DIST_INIT"):
        kwargs = dict(init_method=os.environ["VGGKIT_DIST_INIT"], rank=int(os.environ["RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()), **kwargs)
    return True


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: `cuda` without an index becomes cuda:LOCAL_RANK in a distributed run."""
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_batch_size(batch_size: int, world_size: int) -> None:
    """The global batch is split evenly across ranks: it must divide by their number."""
    if world_size <= 1 or batch_size % world_size == 0:
        return
    below = batch_size // world_size * world_size
    above = below + world_size
    sizes = " or ".join(str(b) for b in (below, above) if b > 0)
    counts = [n for n in range(2, min(batch_size, 64) + 1) if batch_size % n == 0][:6]
    procs = f", or a number of processes that divides {batch_size} ({', '.join(map(str, counts))})" if counts else ""
    raise VggkitError(f"batch size {batch_size} (the global batch, split across processes) does not divide by "
                      f"{world_size} processes; use --batch-size {sizes}{procs}")


class MainRankError(VggkitError):
    """Rank 0's error, raised on the other ranks too (rank 0 prints it; they exit quietly)."""


def from_main(fn):
    """fn() run on rank 0 only, its result given to every rank (broadcast); an error raised there
    is raised on every rank (on the others as a MainRankError with the same message)."""
    rank, world_size = world()
    if world_size == 1:
        return fn()
    box = [None]
    error = None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001  tell the others, then raise it here
            error = e
            box[0] = ("error", str(e) if isinstance(e, VggkitError) else f"on rank 0: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))  # gloo, also beside NCCL
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise MainRankError(value)
    return value


def agree_run_dir(prepare) -> Path:
    """The run directory, chosen once by rank 0 (`prepare()`: a default name holds the time) and given
    to every rank. Under `launch`, rank 0 also tells the launcher where it is ($VGGKIT_RUN_DIR_FILE)."""
    run_dir = from_main(prepare)
    if world()[0] == 0 and os.environ.get("VGGKIT_RUN_DIR_FILE"):
        try:
            with open(os.environ["VGGKIT_RUN_DIR_FILE"], "w") as f:
                f.write(str(run_dir))
        except OSError:
            pass
    return run_dir


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
        print(f"vggkit: error: {error}", file=sys.stderr)
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
    import traceback
    traceback.print_exception(error, file=sys.stderr)
    return 1


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        needle in text for needle in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed",
                                      "Broken pipe", "Timed out", "timed out", "Socket Timeout"))


def agree_stop(stop) -> int | None:
    """The stop signal any rank has received (stop.signal, set on every rank), or None.

    Every rank must call this at the same points of the loop: it is one tiny all-reduce, so that
    all ranks leave the loop after the same step even though a signal reaches them at different times.
    """
    if world()[1] == 1:
        return stop.signal
    flag = torch.tensor([stop.signal or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = int(flag.item())
    if not agreed:
        return None  # even if a signal arrived here meanwhile: the next call sees it, on every rank
    if stop.signal is None:
        stop.signal = agreed
    return agreed


def batch_loss(logits: torch.Tensor, y: torch.Tensor, global_count: int, label_smoothing: float = 0.0):
    """(loss to back-propagate, sum of the per-image losses of this rank's part).

    One process: the mean cross-entropy. Several: this rank's loss sum times world / global_count,
    so that DDP's average of the ranks' gradients is the gradient of the mean over the global batch
    however unevenly the batch was split (a rank with no images contributes zero).
    """
    world_size = world()[1]
    if world_size == 1:
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, loss * len(y)
    loss_sum = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    return loss_sum * (world_size / max(global_count, 1)), loss_sum


def rank_seed(seed: int, step: int) -> int:
    """A seed for this rank's torch RNG (dropout): distinct per rank, a function of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed % 2**64, world()[0], step, 7]).generate_state(1, np.uint64)[0] % 2**63)


# ---------------------------------------------------------------------------------------------
# Batch norm over the global batch

class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm whose statistics (and their gradients) are summed over all ranks.

    Each rank uses torch's own fused CPU kernels: batch_norm_update_stats for its part's mean and
    variance (combined across ranks in float64: one all-reduce of count, sum and sum of squares),
    batch_norm in inference form with the global statistics for the output, and the inference-form
    backward for dy * weight * invstd and the per-channel sums of dy and dy * xhat; after one
    all-reduce of those sums, grad_x gets the global-mean terms: + x * B + C per channel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        c = x.shape[1]
        n_local = x.numel() // max(c, 1)
        if n_local:
            mean_r, var_r = torch.batch_norm_update_stats(x if x.dtype == torch.float32 else x.float(), None, None, 0.0)
            mean_r, var_r = mean_r.double(), var_r.double()  # var_r: biased, over this rank's part
        else:
            mean_r = var_r = torch.zeros(c, dtype=torch.float64, device=x.device)
        stats = torch.cat([mean_r * n_local, (var_r + mean_r * mean_r) * n_local,
                           torch.tensor([float(n_local)], dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        n = stats[-1].item()
        if n < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel over all ranks, got {int(n)}")
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_(min=0)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * n / (n - 1)).to(running_var.dtype), alpha=momentum)
        mean32, var32 = mean.float(), var.float()
        y = F.batch_norm(x, mean32, var32, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean32, var32)
        ctx.n, ctx.eps = n, eps
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var = ctx.saved_tensors
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last) \
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else grad_out.contiguous()
        # inference-form backward with the global statistics: dy * w * invstd, sum(dy * xhat), sum(dy)
        grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        if sum_dy_xhat is None or sum_dy is None:  # no affine parameters: the sums by hand
            invstd = torch.rsqrt(var + ctx.eps).view(shape)
            dims = [d for d in range(x.dim()) if d != 1]
            sum_dy = grad_out.float().sum(dims)
            sum_dy_xhat = (grad_out.float() * (x.float() - mean.view(shape)) * invstd).sum(dims)
        # the affine parameters' gradients are this rank's (DDP averages them across ranks)
        grad_weight = sum_dy_xhat.clone() if ctx.has_weight else None
        grad_bias = sum_dy.clone() if ctx.has_bias else None
        total = torch.cat([sum_dy.double(), sum_dy_xhat.double()])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        mean_dy, mean_dy_xhat = total[:c] / ctx.n, total[c:] / ctx.n
        # grad_x = a * (dy - mean_dy - xhat * mean_dy_xhat), a = w * invstd, xhat = (x - mean) * invstd
        invstd = torch.rsqrt(var.double() + ctx.eps)
        a = (weight.double() if weight is not None else torch.ones_like(invstd)) * invstd
        b = -a * invstd * mean_dy_xhat
        const = -a * mean_dy - b * mean.double()
        if grad_x is None:
            grad_x = grad_out * a.to(grad_out.dtype).view(shape)
        grad_x = grad_x.addcmul_(x, b.to(x.dtype).view(shape)).add_(const.to(x.dtype).view(shape))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer whose training statistics cover the global batch on every device, with gloo
    (torch.nn.SyncBatchNorm runs on GPUs only). Same parameters and buffers as the layer it replaces;
    in eval mode, or in a single process, it is that layer."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if not (self.training and world()[1] > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats and self.running_mean is not None
        return _SyncBatchNormFn.apply(input, self.weight, self.bias, self.running_mean if track else None,
                                      self.running_var if track else None, self.eps, factor)


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Batch norm over the global batch: torch's SyncBatchNorm on GPUs, CpuSyncBatchNorm elsewhere."""
    if device.type in ("cuda", "xpu"):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
            module.__class__ = CpuSyncBatchNorm  # same state: only forward changes
    return model


# ---------------------------------------------------------------------------------------------
# vggkit train --nproc N: torchrun for one machine

_AGENT = ("import sys; from vggkit.distributed import _agent_main; sys.exit(_agent_main(sys.argv[1:]))")


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


def _loopback_interface() -> str | None:
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
    batch_size = getattr(config, "batch_size", None)
    if batch_size is None and resume:
        try:
            from .config import load_config
            batch_size = load_config(Path(resume) / "config.toml").batch_size
        except (VggkitError, OSError):
            batch_size = None  # the ranks will say what is wrong with the run
    if batch_size is not None:
        check_batch_size(batch_size, nproc)

    workdir = tempfile.mkdtemp(prefix="vggkit-torchrun-")
    failure_file = os.path.join(workdir, "failure.json")
    torchrun_args = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", os.path.join(workdir, "rendezvous"), "--rdzv-conf", "store_type=file",
                     "--rdzv-id", f"vggkit-{uuid.uuid4().hex[:12]}", "--local-addr", "127.0.0.1",
                     "--max-restarts", "0", "-m", "vggkit", *strip_nproc(argv)]
    env = dict(os.environ)
    run_dir_file = os.path.join(workdir, "run_dir")
    env.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", VGGKIT_DIST_INIT=f"file://{os.path.join(workdir, 'store')}",
               VGGKIT_FAILURE_FILE=failure_file, VGGKIT_RUN_DIR_FILE=run_dir_file)
    env.setdefault("OMP_NUM_THREADS", str(_default_threads(nproc)))
    env.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's agent: quiet (launch prints its own summary line)
    loopback = _loopback_interface()
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)

    received: list[int] = []
    proc = subprocess.Popen([sys.executable, "-c", _AGENT, *torchrun_args], env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

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
                code = proc.wait()
                break
            except KeyboardInterrupt:  # only if a handler could not be installed
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        failure = _read_json(failure_file)
        run_dir = _read_text(run_dir_file) or resume
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(code, failure, received, nproc, run_dir)


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
    if run_dir and any((Path(run_dir) / "checkpoints" / d / "state.pt").is_file() for d in ("last", "last.prev")):
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
