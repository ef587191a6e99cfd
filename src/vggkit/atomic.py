"""The one way vggkit writes files: whole or absent, only regular files, never through a link.

atomic_write: write beside the final name, fsync, rename. Readers see the old file or the new one,
never half of either; a failure leaves nothing behind. The name it replaces must be absent or a
regular file: a symbolic link, a device, a FIFO or a folder there is refused in one line (a
VggkitError), checked before anything is written and again just before the rename, so that an
output is never renamed over `/dev/null` or in place of a link (which would then point nowhere,
or, followed, write where the link's maker chose).

open_own: a file vggkit writes in place (the run's lock, its event log), opened with O_NOFOLLOW
and refused unless it is a regular file; one it truncates must have no other name (hard link).

make_folder, check_folder: a folder vggkit writes into (or replaces), refused when it is a link.

The temporary names (mkstemp, mkdtemp) are created private (0600/0700); they get the modes a
plain open() would give them (0666/0777 less the umask), so that others on a shared --out can read.
Text is written as UTF-8 whatever the locale (TOML, JSON and CSV are UTF-8), with the bytes of
file names that are not UTF-8 kept as they are (surrogateescape).
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from .errors import VggkitError

ENCODING = "utf-8"
ENCODING_ERRORS = "surrogateescape"  # a file name's undecodable bytes (os.fsdecode) written back as they were

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer before it is refused
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class NotAFile(VggkitError):
    """Where vggkit would write a file (or into a folder) there is something else: a link, a device, a FIFO..."""

    def __init__(self, path: str | Path, kind: str, expected: str = "regular file"):
        super().__init__(f"{path} is a {kind}, not a {expected}; vggkit never follows or replaces a {kind} "
                         "it did not create: remove it or give another path")
        self.path, self.kind = Path(path), kind


def kind_of(mode: int) -> str:
    """What a file's st_mode says it is, in words."""
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


def check_replaceable(path: str | Path) -> None:
    """NotAFile unless `path` is absent or a regular file (a link is not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a file where its folder would be)
        return
    if not stat.S_ISREG(mode):
        raise NotAFile(path, kind_of(mode))


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), fsync, then rename onto path: readers see the old file or the new one.
    Refused (NotAFile) where path is anything but absent or a regular file."""
    path = Path(path)
    check_replaceable(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # the folder refuses a file: name the file asked for, not the temporary
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        honour_umask(tmp)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check_replaceable(path)  # again: nothing was put there while writing
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=ENCODING, errors=ENCODING_ERRORS))


def open_own(path: str | Path, mode: str = "a", *, truncates: bool = False):
    """A text file of vggkit's own, opened in place: "r" (None when absent), "a" (append) or "a+"
    (read and append; created if missing). Never through a symbolic link, never a device or FIFO
    (NotAFile); with `truncates`, never a file with another name (a hard link would lose its contents)."""
    path = Path(path)
    check_replaceable(path)  # a clear message for a link; O_NOFOLLOW below closes the race
    flags = (os.O_RDONLY if mode == "r" else (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_APPEND | os.O_CREAT)
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, 0o666)
    except (FileNotFoundError, NotADirectoryError):
        if mode == "r":
            return None
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a link (EMLINK on FreeBSD)
            raise NotAFile(path, "symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAFile(path, kind_of(info.st_mode))
        if truncates and info.st_nlink > 1:
            raise VggkitError(f"{path} has {info.st_nlink} names (hard links); vggkit rewrites it in place and "
                              "would change the other names' contents too: remove it")
        return os.fdopen(fd, mode, encoding=ENCODING, errors=ENCODING_ERRORS)
    except BaseException:
        os.close(fd)
        raise


def make_folder(path: str | Path) -> Path:
    """The folder `path`, created (with its parents) if missing; NotAFile when it is a link or a file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file or a dangling link: said below
        pass
    check_folder(path)
    return path


def check_folder(path: str | Path) -> None:
    """NotAFile unless `path` is absent or a folder itself (not a link to one)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise NotAFile(path, kind_of(mode), "folder")


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
