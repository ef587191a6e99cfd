"""Downloads: files fetched from a list of mirrors, verified by MD5, written atomically.

Each file is streamed into a temporary file beside its final name and renamed into place
only when it is complete and its MD5 matches (atomic.atomic_write), so nothing that
could pass as valid is ever left in the cache. A bad checksum (or a short body) is retried
once from scratch; any other failure moves on to the next mirror.
"""
from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write


class DownloadError(Exception):
    """No mirror delivered a file; the message says what each mirror did."""


class BadDownload(Exception):
    """The body was short or its MD5 was wrong: worth one retry from scratch."""


def download_file(url: str, path: Path, md5: str | None, *, timeout: float = 30, progress: bool = True) -> None:
    """Stream url into path atomically (nothing is left at path on failure).

    Raises BadDownload (short body, wrong MD5), urllib.error.URLError / HTTPError, OSError.
    """

    def write(tmp: str) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            total = response.length  # Content-Length, or None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                      disable=not progress, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got < total:
            raise BadDownload(f"{url}: incomplete ({got} of {total} bytes)")
        if md5 is not None and digest.hexdigest() != md5:
            raise BadDownload(f"{url}: MD5 {digest.hexdigest()}, expected {md5}")

    try:
        atomic_write(path, write)
    except http.client.IncompleteRead as e:
        raise BadDownload(f"{url}: incomplete ({len(e.partial)} bytes then the connection closed)") from None


def fetch(dest: str | Path, files, mirrors, md5: dict[str, str] | None = None, *, timeout: float = 30,
          progress: bool = True, log=print) -> str:
    """Download `files` into dest, each from the first of `mirrors` that delivers it (verified by
    md5[file] where given); returns the mirror that served the last one. Raises DownloadError.
    """
    dest = Path(dest)
    mirrors, md5 = list(mirrors), md5 or {}
    if not mirrors:
        raise DownloadError("no download mirrors given")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest}: {e.strerror}") from None
    used = mirrors[0]
    for file in files:
        used = _fetch_one(dest / file, mirrors, md5.get(file), timeout, progress, log)
    return used


def _fetch_one(path: Path, mirrors: list[str], md5: str | None, timeout: float, progress: bool, log) -> str:
    """Download path.name from the first mirror that delivers it; returns that mirror."""
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + path.name
        for attempt in range(2):  # a bad body is retried from scratch once, then the next mirror
            log(f"downloading {url}" + (" (retry)" if attempt else ""))
            try:
                download_file(url, path, md5, timeout=timeout, progress=progress)
                return mirror
            except BadDownload as e:
                errors.append(str(e))
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: HTTP {e.code} {e.reason}")
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                errors.append(f"{url}: {reason}")
                break
    raise DownloadError(f"{path.name}: " + "; ".join(errors))
