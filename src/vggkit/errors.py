"""The one error type users see, and the one place that turns any exception reaching the CLI into
one line and an exit code: 2 for bad input (a VggkitError, a path that does not exist or is not
what it should be), 1 for a failure of the machine (a full disk, a folder that refuses to be
written, a read-only file system, an I/O error, memory, the standard output) or of vggkit itself
(an internal error, whose traceback --debug or VGGKIT_DEBUG=1 shows)."""
from __future__ import annotations

import errno
import os
import re

DEBUG_ENV = "VGGKIT_DEBUG"
STDOUT = "<stdout>"  # the file name of an OSError raised writing the standard output (cli.py tags them)
DEBUG_HINT = f"run with --debug or {DEBUG_ENV}=1 for the traceback"


class VggkitError(ValueError):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""


def debug_requested(argv: list[str] | None = None) -> bool:
    """Let tracebacks through: VGGKIT_DEBUG=1 (or true/yes/on), or --debug among the options in argv
    (read before parsing, so that an error while parsing shows its traceback too)."""
    options = (argv[:argv.index("--")] if "--" in argv else argv) if argv else []
    return "--debug" in options or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def user_message(error: BaseException) -> tuple[str, int]:
    """The line to print on stderr and the exit code for an exception that reached the CLI."""
    if isinstance(error, KeyboardInterrupt):
        return "vggkit: interrupted", 130
    if isinstance(error, VggkitError):
        return f"vggkit: error: {one_line(error)}", 2
    if isinstance(error, OSError) and error.filename == STDOUT:  # not about the disk the run is on
        reason = (error.strerror or one_line(error)).lower()
        return f"vggkit: error: cannot write to the standard output: {reason}; send it somewhere that takes it", 1
    if is_disk_full(error):
        return f"vggkit: error: {disk_full_message(error)}", 1
    if isinstance(error, OSError):
        return os_error_message(error)
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or _allocation_failed(error):
        if _allocation_failed(error):
            asked = re.search(r"allocate (\d+) bytes", str(error))
            what = f"torch could not allocate {int(asked[1]):,} bytes" if asked else "torch could not allocate memory"
        else:
            what = one_line(error) or type(error).__name__
        return f"vggkit: error: out of memory ({what}); use a smaller --batch-size or a smaller model", 1
    if isinstance(error, ValueError):  # from a library, about the data it was given
        return f"vggkit: error: {one_line(error) or type(error).__name__}", 1
    return f"vggkit: internal error: {type(error).__name__}: {one_line(error)} ({DEBUG_HINT})", 1


def _allocation_failed(error: BaseException) -> bool:
    """torch's CPU allocator says it failed in a RuntimeError (with C++ frames): memory all the same."""
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def one_line(error: BaseException) -> str:
    """The exception's text on one line (library messages can span several)."""
    return " ".join(str(error).split())


# Path problems, with their fix: exit code 2 (a path that is wrong), or 1 for those in _REFUSED
# (the machine refuses what the path asks: permissions, a read-only file system).
_PATH_FIXES = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions and attributes (chattr) or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOENT: "check the path (a folder in it does not exist or cannot hold files)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file",
    errno.EEXIST: "something else already has that name: choose another path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "it loops through symbolic links: give the real path",
}
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
# The same errors said by Rust (safetensors) or torch's C++ writer, which raise no OSError.
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded", "os error 122")
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(needle in text for needle in _DISK_FULL_TEXT + _TORCH_WRITE_FAILED)


def disk_full_message(error: BaseException) -> str:
    where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
    # torch's writer only says that a write fell short: by far the likeliest cause is a full disk
    maybe = " (or a write failed)" if any(n in str(error) for n in _TORCH_WRITE_FAILED) else ""
    return (f"no space left on device{where}{maybe}: free space on that file system (or write elsewhere) and run "
            "the command again; checkpoints are swapped in only once written whole, so the previous "
            "checkpoint is intact")


def os_error_message(error: OSError) -> tuple[str, int]:
    reason = (error.strerror or one_line(error) or type(error).__name__).lower()
    path = error.filename
    if path is not None and error.errno in _PATH_FIXES:
        also = f" -> {error.filename2}" if error.filename2 else ""
        code = 1 if error.errno in _REFUSED else 2
        return f"vggkit: error: cannot use {path}{also}: {reason}; {_PATH_FIXES[error.errno]}", code
    if path is not None:
        return f"vggkit: error: {path}: {reason}", 1
    return f"vggkit: error: {reason}", 1
