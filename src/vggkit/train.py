"""vggkit.train(): open the run (new or resumed), set up a Trainer (data, loaders, model, optimizer)
and hand it to the epoch loop (loop.py).

    history = vggkit.train({"preset": "fast", "epochs": 5})

The run directory is locked for the whole run; a new one is written only once the data is loaded.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import distributed as dist
from .checkpoint import check_training_state
from .config import TrainConfig, resolve_config, with_absolute_paths
from .loggers import Logger, Loggers, default_loggers
from .optim import lr_at, make_optimizer
from .rundir import STATE, RunDir
from .runtime import ProcessSettings
from .loop import StopRequest, TrainingDiverged, run_epochs, start
from .trainer import History, LoopState, fresh_sums, parallel_and_compiled, restore, set_up


__all__ = ["History", "StopRequest", "TrainingDiverged", "lr_at", "make_optimizer", "train"]


def train(config: TrainConfig | dict | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: str = "auto", log=print, on_step=None, loggers: list[Logger] = ()) -> History:
    """Train a VGG; returns the history. `progress`: auto (bar on a TTY), bar, lines or none.

    `config` is a TrainConfig or a dict of its fields (a "preset" key picks the base preset).
    `resume` is a run directory to continue; `on_step(step)` is called after every step;
    `loggers` are told the run's progress besides the standard outputs (see loggers.py).
    The process-wide settings it changes (threads, denormals, the CPU allocator) are put back on return.
    """
    with ProcessSettings() as settings:
        started = time.perf_counter()
        dist.init_from_env()  # under torchrun: join the process group (a plain process: no-op)
        rank, world_size = dist.world()
        if rank != 0:  # only rank 0 speaks and writes
            log, progress = (lambda *a, **k: None), "none"
        run, config, state = open_run(config, resume, overwrite, world_size)
        try:
            t = set_up(config, run, settings, log, on_step, started, resumed=state is not None)
            if state is None:  # the data is loaded and checked: now the run directory may be written
                dist.from_main(lambda: run.claim(overwrite))
            loop = restore(t, state) if state is not None else LoopState(fresh_sums(t), History(run.path))
            t.step_model = parallel_and_compiled(t, loop.step)
            if t.main:
                show_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
                t.loggers = Loggers([*default_loggers(run, log, show_bar, t.config.tensorboard), *(loggers or ())])
            start(t, loop, resumed=state is not None)
            return run_epochs(t, loop)
        finally:
            run.unlock()


# ---------------------------------------------------------------------------------------------
# Set-up

def open_run(config, resume, overwrite: bool, world_size: int) -> tuple[RunDir, TrainConfig, dict | None]:
    """The run directory, the config and, when resuming, the saved training state."""
    if resume is not None:
        run = RunDir.existing(resume)
        dist.from_main(run.lock)  # held until train() returns: one process trains in a run at a time
        try:
            config = run.resumed_config(config)
            return run, config, check_training_state(run.read_state(), run.last_checkpoint() / STATE)
        except BaseException:
            run.unlock()
            raise
    if not isinstance(config, TrainConfig):
        config = resolve_config(overrides=dict(config or {}))
    config = with_absolute_paths(config)  # the saved config means the same files from any working directory
    # rank 0 names and checks it for all ranks; it is claimed (locked, written) once the data is loaded
    path = dist.agree_run_dir(lambda: RunDir.create(config, overwrite).path)
    return RunDir(path), config, None
