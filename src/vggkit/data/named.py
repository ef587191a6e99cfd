"""A named dataset's files: found on disk, or downloaded into the cache.

Looked for in order among data_dir, data_dir/<name>, $VGGKIT_DATA/<name> and the cache
($XDG_CACHE_HOME or ~/.cache)/vggkit/<name>: the first folder holding all of the dataset's files
(each gz or uncompressed) wins. A local copy is read as it is (no MD5 check); otherwise the
missing files are downloaded into the cache and verified.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import VggkitError
from . import download as dl
from .dataset import Dataset
from .registry import REGISTRY, NamedDataset


class DataNotFound(VggkitError):
    """A named dataset is neither on disk nor downloadable (the case allow_sample covers)."""


def cache_dir(name: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "vggkit" / name


def search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Where a named dataset is looked for, in order."""
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir).expanduser(), Path(data_dir).expanduser() / name]
    if os.environ.get("VGGKIT_DATA"):
        dirs.append(Path(os.environ["VGGKIT_DATA"]).expanduser() / name)
    dirs.append(cache_dir(name))
    return list(dict.fromkeys(dirs))


def find_files(directory: Path, files) -> dict[str, Path]:
    """Those of `files` present in directory, each as named or without its .gz, by their name."""
    found = {}
    for file in files:
        candidates = (file, file[:-3]) if file.endswith(".gz") else (file,)
        for candidate in (directory / c for c in candidates):
            if candidate.is_file():
                found[file] = candidate
                break
    return found


def datasets_with_files_in(directory: Path) -> list[str]:
    """The named datasets some of whose files lie in directory (a folder given where a name was meant)."""
    return [name for name, entry in REGISTRY.items() if find_files(directory, entry.files)]


def load_named(entry: NamedDataset, data_dir, download: bool, mirrors, log) -> tuple[Dataset, Dataset, str]:
    """(train, test, where they came from); raises DataNotFound."""
    files, searched = entry.files, []
    for directory in search_dirs(entry.name, data_dir):
        found = find_files(directory, files)
        if len(found) == len(files):
            return (*_read(entry, found), f"{directory} ({_kind(found)})")
        missing = [f for f in files if f not in found]
        searched.append(f"{directory} (missing {'all' if not found else ', '.join(missing)})")
    cache = cache_dir(entry.name)
    if not download:
        problem = "download disabled"
    else:
        present = find_files(cache, files)
        wanted = [f for f in files if f not in present]
        log(f"{entry.name} not found locally; downloading it into {cache}")
        try:
            mirror = dl.fetch(cache, wanted, entry.mirrors if mirrors is None else mirrors, entry.md5, log=log)
        except dl.DownloadError as e:
            problem = f"download failed: {e}"
        else:
            found = find_files(cache, files)
            return (*_read(entry, found), f"{cache} ({_kind(found)}, downloaded from {mirror})")
    hint_url = (mirrors or entry.mirrors or ["the dataset's site"])[0]
    or_uncompressed = " (or uncompressed)" if any(f.endswith(".gz") for f in files) else ""
    raise DataNotFound(
        f"{entry.name} not found: looked for {', '.join(files)}{or_uncompressed} in {', '.join(searched)}; "
        f"{problem}; put the {len(files)} files in one folder and pass it with --data-dir (or set $VGGKIT_DATA "
        f"to a folder holding {entry.name}/), or download them by hand from {hint_url}")


def _kind(found: dict[str, Path]) -> str:
    """How the files were found, for the log: "gz files", "uncompressed files", ..."""
    unpacked = sum(path.name != name for name, path in found.items())
    if not unpacked:
        return "gz files" if all(name.endswith(".gz") for name in found) else "files"
    return "uncompressed files" if unpacked == len(found) else "gz and uncompressed files"


def _read(entry: NamedDataset, found: dict[str, Path]) -> tuple[Dataset, Dataset]:
    return entry.reader([found[f] for f in entry.files], list(entry.classes))
