"""Files that are whole or absent: write beside the final name, fsync, rename.

Readers see the old file or the new one, never half of either; a failure leaves nothing behind.
The temporary names (mkstemp, mkdtemp) are created private (0600/0700); they get the modes a
plain open() would give them (0666/0777 less the umask), so that others on a shared --out can read.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), fsync, then rename onto path: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        honour_umask(tmp)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def honour_umask(path: str | Path) -> None:
    """Give a file made by mkstemp (or a folder made by mkdtemp) the mode open() (or mkdir) would."""
    full = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, full & ~current_umask())


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask
