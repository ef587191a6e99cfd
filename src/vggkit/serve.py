"""`vggkit serve`: a local web page to try a model: drop or choose images, see the top-5 classes as
bars and the Grad-CAM overlay (one image), or a table of them (many).

A page of its own over the standard library's http.server rather than Gradio (the ecosystem's usual
demo kit): one HTML page and one JSON endpoint need no dependency, where Gradio would bring a web
framework and its front end (tens of packages) for the same two views.

Each upload is sent alone (POST /explain, the raw file as the body), held in memory and read as any
input is (predict.load_image: not an image, a decompression bomb: a message on the page), through
vggkit.explain (the preprocessing of predict); larger than max_upload bytes: refused before it is
read. The server answers every request whatever one of them did; it listens on 127.0.0.1 by
default: this machine only.
"""
from __future__ import annotations

import base64
import html
import io
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from .errors import VggkitError
from .explain import Explainer, overlay
from .untrusted import printable

MAX_UPLOAD = 20 * 2**20  # bytes of one image file
SHOWN_SIDE = 512  # overlays larger than this are scaled down for the page
TOP_K = 5
_DRAIN_LIMIT = 64  # a refused upload up to this many times max_upload is read off, so the browser gets the answer


def make_server(source, host: str = "127.0.0.1", port: int = 0, *, averaged: bool = True, layer: str | None = None,
                max_upload: int = MAX_UPLOAD) -> ThreadingHTTPServer:
    """A server (not yet serving: call serve_forever) for the model at `source` (a run, checkpoint or
    weights file; or a (model, meta) pair); port 0: a free one (server.server_address says which)."""
    explainer = Explainer.of(source, layer, averaged)
    name = "model" if isinstance(source, tuple) else Path(source).name
    try:
        server = ThreadingHTTPServer((host, port), _handler(explainer, name, max_upload))
    except OSError as e:
        raise VggkitError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port") from None
    server.daemon_threads = True
    return server


def serve(source, host: str = "127.0.0.1", port: int = 0, *, averaged: bool = True, log=print) -> None:
    """Serve the page until interrupted (Ctrl-C), after printing its address."""
    server = make_server(source, host, port, averaged=averaged)
    log(f"serving {source} at {url_of(server)} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def answer(explainer: Explainer, data: bytes, name: str) -> dict:
    """What the page shows for one uploaded file: top classes, the class explained, the overlay as a data URL."""
    upload = io.BytesIO(data)
    upload.name = name
    found = explainer.explain([upload], top_k=TOP_K)[0]
    picture = overlay(found, min_side=64)
    picture.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
    png = io.BytesIO()
    picture.save(png, format="PNG")
    return {"name": name, "top": found.top, "target": found.target, "probability": found.probability,
            "layer": found.layer, "overlay": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}


def _handler(explainer: Explainer, name: str, max_upload: int):
    lock = threading.Lock()  # one explanation at a time: the model's hooks and kernels mode are shared
    page = PAGE.replace("{{NAME}}", html.escape(name)).replace("{{MAX}}", str(max_upload))

    class Handler(BaseHTTPRequestHandler):
        server_version = "vggkit"

        def do_GET(self):
            if urlparse(self.path).path != "/":
                return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/explain":
                return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            file_name = printable(unquote(parse_qs(url.query).get("name", ["the image"])[0]))[:200]
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "send the file with its length"})
            if length > max_upload:
                self._drain(length)
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                    "error": f"{file_name} is too large ({length / 2**20:.1f} MiB); "
                             f"the limit is {max_upload / 2**20:.1f} MiB: shrink it first"})
            data = self.rfile.read(length)
            try:
                with lock:
                    result = answer(explainer, data, file_name)
            except VggkitError as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"name": file_name, "error": str(e)})
            except Exception as e:  # noqa: BLE001 - the page says so; the server keeps serving
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                  {"name": file_name, "error": f"{file_name} failed: {type(e).__name__}: {e}"})
            self._json(HTTPStatus.OK, result)

        def _drain(self, length: int) -> None:
            if length > _DRAIN_LIMIT * max_upload:
                self.close_connection = True
                return
            while length > 0:
                chunk = self.rfile.read(min(length, 2**20))
                if not chunk:
                    break
                length -= len(chunk)

        def _json(self, status, body: dict) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # quiet: the page shows what happened
            pass

    return Handler


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vggkit: {{NAME}}</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 24px auto; max-width: 920px; color: #222; }
 h1 { font-size: 20px; margin: 0 0 12px; } h1 span { color: #777; font-weight: normal; }
 #drop { border: 2px dashed #99a; border-radius: 8px; padding: 22px; text-align: center; color: #555; }
 #drop.over { background: #eef; }
 .card { display: flex; gap: 24px; margin-top: 20px; align-items: flex-start; }
 .card img { width: 320px; image-rendering: pixelated; border-radius: 4px; }
 table img { width: 96px; image-rendering: pixelated; }
 table { border-collapse: collapse; margin-top: 20px; width: 100%; }
 td, th { border-bottom: 1px solid #ddd; padding: 6px; text-align: left; vertical-align: middle; }
 .bars { min-width: 300px; } .row { display: flex; align-items: center; gap: 8px; margin: 4px 0; }
 .label { width: 130px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
 .track { flex: 1; background: #eee; height: 16px; border-radius: 3px; }
 .fill { background: #3b6fd4; height: 16px; border-radius: 3px; } .pct { width: 56px; text-align: right; }
 .error { color: #b00020; } .top-class { font-weight: 600; font-size: 17px; }
 .note { color: #666; font-size: 13px; }
</style></head><body>
<h1>vggkit <span>{{NAME}}</span></h1>
<div id="drop">Drop images here, or <input type="file" id="pick" accept="image/*" multiple></div>
<div id="results"></div>
<script>
const MAX = {{MAX}};
const results = document.getElementById('results');
const drop = document.getElementById('drop');
function text(tag, value, cls) { const e = document.createElement(tag); e.textContent = value; if (cls) e.className = cls; return e; }
function bars(top) {
  const box = document.createElement('div'); box.className = 'bars';
  for (const t of top) {
    const row = document.createElement('div'); row.className = 'row';
    row.append(text('span', t['class'], 'label'));
    const track = document.createElement('div'); track.className = 'track';
    const fill = document.createElement('div'); fill.className = 'fill';
    fill.style.width = (100 * t.probability).toFixed(1) + '%'; track.append(fill);
    row.append(track, text('span', (100 * t.probability).toFixed(1) + '%', 'pct'));
    box.append(row);
  }
  return box;
}
async function ask(file) {
  if (file.size > MAX) return {name: file.name, error: `${file.name} is too large (${(file.size / 2**20).toFixed(1)} MiB); the limit is ${(MAX / 2**20).toFixed(1)} MiB: shrink it first`};
  try {
    const r = await fetch('explain?name=' + encodeURIComponent(file.name), {method: 'POST', body: file});
    return await r.json();
  } catch (e) { return {name: file.name, error: `${file.name}: the server did not answer (${e})`}; }
}
function card(a) {
  const box = document.createElement('div'); box.className = 'card result';
  if (a.error) { box.append(text('div', a.error, 'error')); return box; }
  const img = document.createElement('img'); img.src = a.overlay; img.alt = 'Grad-CAM of ' + a.name;
  const side = document.createElement('div');
  side.append(text('div', a.top[0]['class'], 'top-class'), text('div', a.name, 'note'), bars(a.top),
              text('div', `Grad-CAM of ${a.target} (${(100 * a.probability).toFixed(1)}%) at ${a.layer}`, 'note'));
  box.append(img, side); return box;
}
function table(answers) {
  const t = document.createElement('table'); const head = t.insertRow();
  for (const h of ['image', 'Grad-CAM', 'top class', 'top 5']) head.append(text('th', h));
  for (const a of answers) {
    const row = t.insertRow(); row.className = 'result'; row.insertCell().textContent = a.name;
    if (a.error) { const c = row.insertCell(); c.colSpan = 3; c.append(text('span', a.error, 'error')); continue; }
    const img = document.createElement('img'); img.src = a.overlay; row.insertCell().append(img);
    row.insertCell().append(text('span', a.top[0]['class'], 'top-class'));
    row.insertCell().append(bars(a.top));
  }
  return t;
}
async function show(files) {
  files = Array.from(files); if (!files.length) return;
  results.replaceChildren(text('p', `working on ${files.length} image(s)...`, 'note'));
  const answers = [];
  for (const f of files) answers.push(await ask(f));
  results.replaceChildren(answers.length === 1 ? card(answers[0]) : table(answers));
  results.dataset.done = String(Date.now());
}
document.getElementById('pick').addEventListener('change', e => show(e.target.files));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); show(e.dataTransfer.files); });
</script></body></html>
"""
