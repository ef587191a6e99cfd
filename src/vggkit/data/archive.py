"""Datasets shipped as one tar archive (CIFAR): found as the archive or as its extracted folder.

Members are read by their exact expected names into memory; nothing is ever extracted to disk,
so a member's path inside the archive cannot write anywhere. A reader gets the members in the
order of Archive.files: the needed ones, then the optional ones (None where absent).
"""
from __future__ import annotations

import gzip
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import VggkitError

GZIP_MAGIC = b"\x1f\x8b"


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

    def read_extracted(self, folder: Path) -> list[Member | None]:
        """The members from an extracted copy, in the order of files."""
        found = []
        for name in self.files:
            path = folder / name
            if not path.is_file():
                found.append(None)
                continue
            try:
                found.append(Member(name, path.read_bytes(), str(path), path))
            except OSError as e:
                raise VggkitError(f"cannot read {path}: {e.strerror}; check its permissions") from None
        return found

    def read_archive(self, path: Path) -> list[Member | None]:
        """The members from the tar archive at path, in the order of files; raises VggkitError when a
        needed one is missing or the archive is damaged."""
        data = _read_members(path, {f"{self.folder}/{name}": name for name in self.files})
        missing = [f"{self.folder}/{m}" for m in self.members if m not in data]
        if missing:
            raise VggkitError(f"{path} lacks {', '.join(missing)}; is it the right archive? delete it and get "
                              "the original again")
        return [Member(n, data[n], f"{path} member {self.folder}/{n}", path) if n in data else None
                for n in self.files]


def _read_members(path: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """The regular-file members of the tar at path whose names are keys of wanted, by wanted's values."""
    found = {}
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # one pass: no seeking in the gzip
                for info in tar:
                    name = wanted.get(info.name.removeprefix("./"))
                    if name is not None and info.isreg():
                        found[name] = tar.extractfile(info).read()
            # to the end, where gzip checks its CRC: a damaged stream can end the tar early without an error
            while stream.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise VggkitError(f"{path} is not a readable tar archive or is damaged ({e}); delete it and get it "
                          "again") from None
    except OSError as e:
        raise VggkitError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None
    return found
