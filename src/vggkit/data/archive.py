"""Datasets shipped as one tar archive (CIFAR): found as the archive or as its extracted folder.

Members are read by their exact expected names into memory; nothing is ever extracted to disk,
so a member's path inside the archive cannot write anywhere. A reader gets the members in the
order of Archive.files: the needed ones, then the optional ones (None where absent).

Sizes are bounded before anything is read: a member (or extracted file) larger than its limit
(the reader's, e.g. CIFAR's record counts) is refused from its tar header (or its size on disk),
and a compressed archive is decompressed no further than its members' limits together allow
(plus SLACK for tar headers and the files a reader does not take): a small archive holding
gigabytes of zeros stops there.
"""
from __future__ import annotations

import gzip
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import VggkitError

GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_LIMIT = (1 << 20, "the 1 MiB a names file may have")  # a member without a limit of its own
SLACK = 16 << 20  # what an archive may hold besides its members' data: tar headers, a readme, ...


@dataclass(frozen=True)
class Member:
    """One member's bytes, and how to name it (and what to replace) in a message."""
    name: str  # its name inside the archive's folder
    data: bytes
    where: str  # "ARCHIVE member FOLDER/NAME" or the extracted file's path
    source: Path  # the file to delete and get again when the member is damaged


@dataclass(frozen=True)
class Archive:
    """The members of a dataset's tar archive (gzip-compressed or not) that its reader takes."""
    folder: str  # the archive's top folder, and the name of its extracted copy
    members: tuple[str, ...]  # needed, relative to folder
    optional: tuple[str, ...] = ()  # taken when present

    @property
    def files(self) -> tuple[str, ...]:
        return self.members + self.optional

    def extracted_in(self, directory: Path) -> Path | None:
        """The extracted copy in directory (directory/folder, or directory itself) holding every needed member."""
        for candidate in (directory / self.folder, directory):
            if all((candidate / m).is_file() for m in self.members):
                return candidate
        return None

    def partly_in(self, directory: Path) -> bool:
        """Whether some member lies in directory or in directory/folder (a hint for a misplaced copy)."""
        return any((d / m).is_file() for d in (directory, directory / self.folder) for m in self.files)

    def read_extracted(self, folder: Path, limits: dict[str, tuple[int, str]] | None = None) -> list[Member | None]:
        """The members from an extracted copy, in the order of files; limits: name -> (the most bytes
        it may have, what they are, for the message; DEFAULT_LIMIT if not listed), checked before it is read."""
        found = []
        for name in self.files:
            path = folder / name
            if not path.is_file():
                found.append(None)
                continue
            try:
                _check_size(str(path), path.stat().st_size, _limit(limits, name), path)
                with open(path, "rb") as f:
                    data = f.read(_limit(limits, name)[0] + 1)  # the size may have grown since
                _check_size(str(path), len(data), _limit(limits, name), path)
                found.append(Member(name, data, str(path), path))
            except OSError as e:
                raise VggkitError(f"cannot read {path}: {e.strerror}; check its permissions") from None
        return found

    def read_archive(self, path: Path, limits: dict[str, tuple[int, str]] | None = None) -> list[Member | None]:
        """The members from the tar archive at path, in the order of files; raises VggkitError when a
        needed one is missing or larger than its limit (as read_extracted), or the archive is damaged."""
        wanted = {f"{self.folder}/{name}": name for name in self.files}
        total = sum(_limit(limits, name)[0] for name in self.files) + SLACK
        data = _read_members(path, wanted, {name: _limit(limits, name) for name in self.files}, total)
        missing = [f"{self.folder}/{m}" for m in self.members if m not in data]
        if missing:
            raise VggkitError(f"{path} lacks {', '.join(missing)}; is it the right archive? delete it and get "
                              "the original again")
        return [Member(n, data[n], f"{path} member {self.folder}/{n}", path) if n in data else None
                for n in self.files]


def _limit(limits: dict[str, tuple[int, str]] | None, name: str) -> tuple[int, str]:
    return (limits or {}).get(name, DEFAULT_LIMIT)


def _check_size(where: str, size: int, limit: tuple[int, str], source: Path) -> None:
    most, what = limit
    if size > most:
        raise VggkitError(f"{where} is {size:,} bytes, more than {what} ({most:,} bytes); it is damaged or not the "
                          f"right file: delete {source} and get it again")


class _TooLong(Exception):
    """The archive's data ran past what its members can fill."""


class _Capped:
    """A stream that raises _TooLong once more than `cap` bytes were read from it."""

    def __init__(self, stream, cap: int):
        self.stream, self.cap, self.read_so_far = stream, cap, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n if n is not None and n >= 0 else self.cap + 1 - self.read_so_far)
        self.read_so_far += len(data)
        if self.read_so_far > self.cap:
            raise _TooLong()
        return data


def _read_members(path: Path, wanted: dict[str, str], limits: dict[str, tuple[int, str]],
                  total: int) -> dict[str, bytes]:
    """The regular-file members of the tar at path whose names are keys of wanted, by wanted's values;
    a member over its limit (by its header) or an archive over `total` bytes (decompressed) is refused."""
    found = {}
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            stream = _Capped(gzip.GzipFile(fileobj=raw) if gzipped else raw, total)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # one pass: no seeking in the gzip
                for info in tar:
                    name = wanted.get(info.name.removeprefix("./"))
                    if name is not None and info.isreg():
                        _check_size(f"{path} member {info.name}", info.size, limits[name], path)
                        found[name] = tar.extractfile(info).read()
            # to the end, where gzip checks its CRC: a damaged stream can end the tar early without an error
            while stream.read(1 << 20):
                pass
    except _TooLong:
        raise VggkitError(f"{path} holds more than the {total:,} bytes its members can fill (decompressed); it is "
                          "damaged or not the right archive: delete it and get it again") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise VggkitError(f"{path} is not a readable tar archive or is damaged ({e}); delete it and get it "
                          "again") from None
    except OSError as e:
        raise VggkitError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None
    return found
