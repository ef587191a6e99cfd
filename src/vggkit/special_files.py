"""Special files (FIFOs, devices, sockets) are refused wherever vggkit reads a file the user names.

Opening a FIFO to read waits for a writer, for ever if none comes; a device such as /dev/zero reads
without end. Every reader of a user's file (an image, a config, weights, a training state) calls
refuse_special first; folders of images list regular files only (data/image.image_files), so a
FIFO among the images is passed over there, as any file that is not an image is.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import VggkitError

_KINDS = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
          stat.S_ISSOCK: "a socket"}


def refuse_special(path: str | Path, what: str = "file") -> Path:
    """`path`, unless it is (or links to) a special file: then a VggkitError naming it as `what`. A path
    that is missing, a folder or cannot be looked at is returned: the reader's own open says why."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return Path(path)
    kind = next((name for test, name in _KINDS.items() if test(mode)), None)
    if kind is not None:
        raise VggkitError(f"{what} {path} is {kind}, not a regular file; give a regular file")
    return Path(path)
