"""A named dataset's files: found on disk, or downloaded into the cache.

Looked for in order among data_dir, data_dir/<name>, $VGGKIT_DATA/<name> and the cache
($XDG_CACHE_HOME or ~/.cache)/vggkit/<name>: the first folder holding all of the dataset's files
(each gz or uncompressed; for an archive dataset the archive, or its extracted folder in or as
that folder) wins. A local copy is read as it is (no MD5 check); otherwise the missing files are
downloaded into the cache and verified.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class Found:
    """What of a named dataset lies in one folder."""
    files: dict[str, Path]  # of entry.files, by name
    extracted: Path | None = None  # an archive dataset's extracted folder, holding all its needed members

    def complete(self, entry: NamedDataset) -> bool:
        return self.extracted is not None or len(self.files) == len(entry.files)


def find(entry: NamedDataset, directory: Path) -> Found:
    """The dataset's files (and an archive dataset's extracted folder) in directory."""
    extracted = entry.archive.extracted_in(directory) if entry.archive else None
    return Found(find_files(directory, entry.files), extracted)


def datasets_with_files_in(directory: Path) -> list[str]:
    """The named datasets some of whose files lie in directory (a folder given where a name was meant)."""
    return [name for name, entry in REGISTRY.items()
            if find_files(directory, entry.files) or (entry.archive and entry.archive.partly_in(directory))]


def load_named(entry: NamedDataset, data_dir, download: bool, mirrors, log) -> tuple[Dataset, Dataset, str]:
    """(train, test, where they came from); raises DataNotFound."""
    files, searched = entry.files, []
    for directory in search_dirs(entry.name, data_dir):
        found = find(entry, directory)
        if found.complete(entry):
            return (*_read(entry, found), f"{found.extracted or directory} ({_kind(entry, found)})")
        searched.append(f"{directory} ({_missing(entry, directory, found)})")
    cache = cache_dir(entry.name)
    if not download:
        problem = "download disabled"
    else:
        wanted = [f for f in files if f not in find_files(cache, files)]
        log(f"{entry.name} not found locally; downloading it into {cache}")
        try:
            mirror = dl.fetch(cache, wanted, entry.mirrors if mirrors is None else mirrors, entry.md5, log=log)
        except dl.DownloadError as e:
            problem = f"download failed: {e}"
        else:
            found = Found(find_files(cache, files))  # the downloaded files, not a stale extracted copy
            return (*_read(entry, found), f"{cache} ({_kind(entry, found)}, downloaded from {mirror})")
    raise DataNotFound(_not_found(entry, searched, problem, mirrors))


def _not_found(entry: NamedDataset, searched: list[str], problem: str, mirrors) -> str:
    files = entry.files
    hint_url = (mirrors or entry.mirrors or ["the dataset's site"])[0]
    if entry.archive:
        wanted = f"{files[0]} (or its extracted folder {entry.archive.folder}/)"
        put = "put the archive or its extracted folder in a folder"
        hint_url = hint_url.rstrip("/") + "/" + files[0]
    else:
        wanted = ", ".join(files) + (" (or uncompressed)" if any(f.endswith(".gz") for f in files) else "")
        put = f"put the {len(files)} files in one folder"
    return (f"{entry.name} not found: looked for {wanted} in {', '.join(searched)}; {problem}; {put} and pass it "
            f"with --data-dir (or set $VGGKIT_DATA to a folder holding {entry.name}/), or download "
            f"{'it' if len(files) == 1 else 'them'} by hand from {hint_url}")


def _missing(entry: NamedDataset, directory: Path, found: Found) -> str:
    """What a folder lacks, for the message that nothing was found."""
    missing = [f for f in entry.files if f not in found.files]
    text = f"missing {'all' if not found.files else ', '.join(missing)}"
    if entry.archive and entry.archive.partly_in(directory):
        text += f"; an extracted {entry.archive.folder}/ there lacks some of {', '.join(entry.archive.members)}"
    return text


def _kind(entry: NamedDataset, found: Found) -> str:
    """How the files were found, for the log: "gz files", "uncompressed files", "archive", ..."""
    if entry.archive:
        return "extracted archive" if found.extracted is not None else "archive"
    unpacked = sum(path.name != name for name, path in found.files.items())
    if not unpacked:
        return "gz files" if all(name.endswith(".gz") for name in found.files) else "files"
    return "uncompressed files" if unpacked == len(found.files) else "gz and uncompressed files"


def _read(entry: NamedDataset, found: Found) -> tuple[Dataset, Dataset]:
    classes = list(entry.classes)
    if entry.archive is None:
        return entry.reader([found.files[f] for f in entry.files], classes)
    limits = entry.reader.member_limits(entry.archive) if hasattr(entry.reader, "member_limits") else None
    if found.extracted is not None:
        return entry.reader(entry.archive.read_extracted(found.extracted, limits), classes)
    return entry.reader(entry.archive.read_archive(found.files[entry.files[0]], limits), classes)
