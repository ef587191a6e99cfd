"""Multi-process training on torch.distributed (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK).

How a distributed run works (train.py calls these helpers; a single process never needs them):

- `init_from_env()` joins the process group torchrun describes (gloo on CPU; gloo for CPU tensors
  and NCCL for CUDA tensors on a GPU machine), with a collective timeout of $VGGKIT_DIST_TIMEOUT
  seconds (default 60), so a rank whose peer died stops instead of hanging.
- The global batch (--batch-size) is split across ranks by the BatchLoader; `batch_loss` weights
  each rank's loss so that DDP's gradient average equals the gradient of the mean loss over the
  global batch, also when the last batch of an epoch splits unevenly (or leaves a rank nothing).
- Batch norm statistics are computed over the global batch (`convert_sync_batchnorm`: torch's
  SyncBatchNorm on GPUs, `CpuSyncBatchNorm` on CPUs, where torch's refuses to run).
- `from_main` runs a step on rank 0 only (choosing the run directory) and gives every rank its
  result; `agree_stop` makes all ranks stop at the same step when any of them got SIGINT/SIGTERM.
- `run_rank` ends a rank of the CLI: errors as one line (a rank that lost its peers says so,
  exit code 3), then os._exit (see there why).
- `launch(nproc, argv)` (`vggkit train --nproc N`) runs torchrun's agent for one machine in a
  subprocess, forwards SIGINT/SIGTERM to it and, when a rank fails, prints one line naming it.
"""
from __future__ import annotations

from .collectives import (DEFAULT_TIMEOUT, MainRankError, agree_run_dir, agree_stop, all_reduce_sum, from_main,
                          init_from_env, is_main, local_device, timeout_seconds, world)
from .global_batch import batch_loss, check_batch_size, rank_seed
from .launcher import (LOST_PEER_EXIT, describe_failure, is_collective_failure, launch, loopback_interface,
                       pick_root_failure, run_rank, strip_nproc)
from .syncbn import CpuSyncBatchNorm, convert_sync_batchnorm

__all__ = ["DEFAULT_TIMEOUT", "LOST_PEER_EXIT", "MainRankError", "CpuSyncBatchNorm", "agree_run_dir", "agree_stop",
           "all_reduce_sum", "batch_loss", "check_batch_size", "convert_sync_batchnorm", "describe_failure",
           "from_main", "init_from_env", "is_collective_failure", "is_main", "launch", "local_device",
           "loopback_interface", "pick_root_failure", "rank_seed", "run_rank", "strip_nproc", "timeout_seconds",
           "world"]
