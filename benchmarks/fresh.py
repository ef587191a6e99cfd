"""Run a benchmark's worker in a fresh Python process (the allocator, oneDNN's state and the peak
RSS belong to a process): `script --worker ARGS...`, whose last line of output is JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class WorkerFailed(RuntimeError):
    """The worker exited non-zero; the message is the tail of its stderr."""


def run_worker(script: str, *args: str, timeout: float | None = None, env: dict | None = None) -> dict:
    """The worker's result; raises WorkerFailed, or subprocess.TimeoutExpired after `timeout` s."""
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env={**os.environ, **(env or {}), "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise WorkerFailed(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
