"""The downloader against a local HTTP server on 127.0.0.1 serving small IDX gz files."""
import gzip
import hashlib
import http.server
import socket
import struct
import threading
from collections import Counter

import numpy as np
import pytest

from dataclasses import replace

from vggkit import data as D
from vggkit.errors import VggkitError

NAMED_FILES = D.REGISTRY["fashion-mnist"].files


def idx_gz(array) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    return gzip.compress(b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                         + array.tobytes())


FILES = dict(zip(NAMED_FILES, (
    idx_gz(np.random.default_rng(0).integers(0, 256, (20, 28, 28))), idx_gz(np.arange(20) % 10),
    idx_gz(np.random.default_rng(1).integers(0, 256, (10, 28, 28))), idx_gz(np.arange(10)),
)))


class Server(http.server.ThreadingHTTPServer):
    """routes: path -> list of responses (the last one repeats): bytes, ("short", bytes) or an HTTP status."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes, self.hits = {}, Counter()

    def url(self, prefix):
        return f"http://127.0.0.1:{self.server_port}/{prefix}/"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits[self.path] += 1
        responses = self.server.routes.get(self.path, [404])
        response = responses[min(self.server.hits[self.path], len(responses)) - 1]
        if isinstance(response, int):
            self.send_error(response)
            return
        short = isinstance(response, tuple)
        body = response[1] if short else response
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if short else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    s = Server()
    thread = threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.delenv("VGGKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    use_registry(monkeypatch, md5={f: hashlib.md5(b).hexdigest() for f, b in FILES.items()},
                 reader=D.IdxFormat("Fashion-MNIST", counts=(20, 10)))
    return tmp_path / "xdg" / "vggkit" / "fashion-mnist"


def use_registry(monkeypatch, **changes):
    """The fashion-mnist registry entry with these fields changed, for this test."""
    monkeypatch.setitem(D.REGISTRY, "fashion-mnist", replace(D.REGISTRY["fashion-mnist"], **changes))


def serve(server, prefix, files=FILES, **override):
    for name, body in files.items():
        server.routes[f"/{prefix}/{name}"] = override.get(name, [body])


def load(**kwargs):
    return D.load_data("fashion-mnist", val_size=0, log=lambda *_: None, **kwargs)


def leftovers(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_success(server, env, monkeypatch):
    serve(server, "m1")
    use_registry(monkeypatch, mirrors=(server.url("m1"),))  # the registry's own mirrors
    result = load()
    assert len(result.train) == 20 and len(result.test) == 10
    assert "downloaded from" in result.source and str(env) in result.source
    assert leftovers(env) == sorted(NAMED_FILES)
    assert all((env / f).read_bytes() == b for f, b in FILES.items())
    # found in the cache next time: no new request
    load(mirrors=[server.url("m1")])
    assert sum(server.hits.values()) == 4


def test_bad_checksum_retried_once(server, env):
    first = NAMED_FILES[0]
    serve(server, "m1", **{first: [b"\x1f\x8bnot this", FILES[first]]})
    result = load(mirrors=[server.url("m1")])
    assert len(result.train) == 20 and server.hits[f"/m1/{first}"] == 2


@pytest.mark.parametrize("bad", ["truncated", "checksum"])
def test_failure_leaves_nothing(server, env, bad):
    first = NAMED_FILES[0]
    body = ("short", FILES[first]) if bad == "truncated" else idx_gz(np.zeros((20, 28, 28)))
    serve(server, "m1", **{first: [body]})
    with pytest.raises(VggkitError) as e:
        load(mirrors=[server.url("m1")])
    message = str(e.value)
    assert "\n" not in message and "download failed" in message
    assert ("incomplete" if bad == "truncated" else "MD5") in message
    assert server.hits[f"/m1/{first}"] == 2  # one retry from scratch
    assert leftovers(env) == []  # no final file, no temporary file


def test_404_then_second_mirror(server, env):
    serve(server, "good")
    result = load(mirrors=[server.url("missing"), server.url("good")])
    assert len(result.train) == 20 and "/good/" in result.source
    assert all(server.hits[f"/missing/{f}"] == 1 for f in NAMED_FILES)  # no retry on a 404


def test_only_missing_files_fetched(server, env):
    env.mkdir(parents=True)
    for f in NAMED_FILES[:2]:
        (env / f).write_bytes(FILES[f])
    serve(server, "m1")
    load(mirrors=[server.url("m1")])
    assert set(server.hits) == {f"/m1/{f}" for f in NAMED_FILES[2:]}


def test_offline(env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(VggkitError) as e:
        load(mirrors=[f"http://127.0.0.1:{port}/"])
    message = str(e.value)
    assert "\n" not in message
    for part in ("fashion-mnist not found", "download failed", "train-images-idx3-ubyte.gz", str(env),
                 "--data-dir", "$VGGKIT_DATA", "by hand"):
        assert part in message
    assert leftovers(env) == []
    # ... and with the sample allowed, the run goes on with it
    logged = []
    result = D.load_data("fashion-mnist", mirrors=[f"http://127.0.0.1:{port}/"], allow_sample=True,
                         log=logged.append)
    assert result.is_sample and any("NOT comparable" in line for line in logged)


def test_a_new_named_dataset_is_one_registry_entry(server, env, monkeypatch):
    """An .npz dataset with its own reader: registered, downloaded, verified and split like the others."""
    import io

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), y=np.arange(30) % 3)
    body = buffer.getvalue()

    def read_npz(paths, classes):
        with np.load(paths[0]) as z:
            data = D.Dataset(z["x"], z["y"].astype(np.int64), classes)
        return data.subset(range(20)), data.subset(range(20, 30))

    entry = D.NamedDataset(name="tiny", classes=("r", "g", "b"), md5={"tiny.npz": hashlib.md5(body).hexdigest()},
                           mirrors=(server.url("t"),), reader=read_npz, val_size=5, flips_safe=False)
    monkeypatch.setitem(D.REGISTRY, "tiny", entry)
    server.routes["/t/tiny.npz"] = [body]
    result = D.load_data("tiny", log=lambda *_: None)
    assert (len(result.train), len(result.val), len(result.test)) == (15, 5, 10)
    assert result.classes == ["r", "g", "b"] and not result.flips_safe and result.train.channels == 3
    assert leftovers(env.parent / "tiny") == ["tiny.npz"] and "(files, downloaded from" in result.source


def test_download_file_alone(server, tmp_path):
    """The building block other downloads (weights) use: verified, atomic, nothing left on failure."""
    from vggkit.data.download import BadDownload, download_file

    body = b"weights" * 1000
    server.routes["/w/model.bin"] = [body]
    download_file(server.url("w") + "model.bin", tmp_path / "model.bin", hashlib.md5(body).hexdigest(), progress=False)
    assert (tmp_path / "model.bin").read_bytes() == body
    with pytest.raises(BadDownload, match="MD5"):
        download_file(server.url("w") + "model.bin", tmp_path / "other.bin", "0" * 32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_flip_safety_comes_from_the_registry():
    assert D.REGISTRY["fashion-mnist"].flips_safe and not D.REGISTRY["mnist"].flips_safe
    assert D.load_data("fashion-mnist-sample", val_size=0, log=lambda *_: None).flips_safe
