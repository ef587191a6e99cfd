"""Fetch the named datasets' gz files from their official mirrors, verified by MD5.

Each file is streamed into a temporary file beside its final name and renamed into place
only when it is complete and its MD5 matches (checkpoint.atomic_write), so nothing that
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

from .checkpoint import atomic_write

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# Tried in order. Tests point these at a local server.
MIRRORS: dict[str, list[str]] = {
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ],
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
}

MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}


class DownloadError(Exception):
    """No mirror delivered a file; the message says what each mirror did."""


class _BadDownload(Exception):
    """The body was short or its MD5 was wrong: worth one retry from scratch."""


def download_file(url: str, path: Path, md5: str | None, *, timeout: float = 30, progress: bool = True) -> None:
    """Stream url into path atomically; raise _BadDownload / URLError / OSError on failure."""

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
            raise _BadDownload(f"{url}: incomplete ({got} of {total} bytes)")
        if md5 is not None and digest.hexdigest() != md5:
            raise _BadDownload(f"{url}: MD5 {digest.hexdigest()}, expected {md5}")

    try:
        atomic_write(path, write)
    except http.client.IncompleteRead as e:
        raise _BadDownload(f"{url}: incomplete ({len(e.partial)} bytes then the connection closed)") from None


def fetch(name: str, dest: str | Path, files=FILES, *, mirrors: list[str] | None = None,
          md5: dict[str, str] | None = None, timeout: float = 30, progress: bool = True, log=print) -> str:
    """Download `files` of dataset `name` into dest; returns the mirror that served the last one.

    mirrors / md5 default to MIRRORS[name] / MD5[name]. Raises DownloadError.
    """
    dest = Path(dest)
    mirrors = list(MIRRORS.get(name, []) if mirrors is None else mirrors)
    md5 = MD5.get(name, {}) if md5 is None else md5
    if not mirrors:
        raise DownloadError(f"no download mirrors known for {name}")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest}: {e.strerror}") from None
    used = mirrors[0]
    for file in files:
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + file
            done = False
            for attempt in range(2):
                log(f"downloading {url}" + (" (retry)" if attempt else ""))
                try:
                    download_file(url, dest / file, md5.get(file), timeout=timeout, progress=progress)
                    done = True
                except _BadDownload as e:
                    errors.append(str(e))
                    continue  # retry from scratch once, then the next mirror
                except urllib.error.HTTPError as e:
                    errors.append(f"{url}: HTTP {e.code} {e.reason}")
                except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                    reason = getattr(e, "reason", None) or e
                    errors.append(f"{url}: {reason}")
                break
            if done:
                used = mirror
                break
        else:
            raise DownloadError(f"{file}: " + "; ".join(errors))
    return used
