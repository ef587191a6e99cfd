"""`vggkit serve`: the JSON endpoint (top classes and the Grad-CAM overlay of an upload; not an image,
too large, a decompression bomb: a message, and the server keeps answering), and the page in a real
headless Chromium (selenium, the system's chromium and chromedriver): upload, read the top class."""
import base64
import io
import json
import shutil
import struct
import tempfile
import threading
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import random_rgb_weights

from vggkit.predict import predict
from vggkit.serve import make_server, url_of

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,700"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_rgb_weights(tmp_path_factory.mktemp("serve") / "weights", CLASSES, 16)


@pytest.fixture(scope="module")
def server(weights):
    server = make_server(weights, max_upload=200_000)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(16, 16), (30, 20), (24, 40)]):
        paths.append(root / f"picture{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    (root / "notes.txt").write_text("not an image")
    return paths, root / "notes.txt"


def post(server, data: bytes, name: str) -> tuple[int, dict]:
    request = urllib.request.Request(url_of(server) + "explain?name=" + name, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def page_answers(server) -> bool:
    with urllib.request.urlopen(url_of(server), timeout=30) as response:
        return response.status == 200 and b"Drop images here" in response.read()


def bomb_png(side: int = 40_000) -> bytes:
    """A PNG whose header claims side x side pixels (more than Pillow opens) in a few bytes."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_upload_gets_predicts_top_classes_and_an_overlay(server, weights, pictures):
    paths, _ = pictures
    status, answer = post(server, paths[1].read_bytes(), "picture1.png")
    assert status == 200 and answer["name"] == "picture1.png"
    expected = predict(weights, [paths[1]], top_k=5, compile="off")[0]["top"]
    assert [t["class"] for t in answer["top"]] == [t["class"] for t in expected]
    np.testing.assert_allclose([t["probability"] for t in answer["top"]], [t["probability"] for t in expected],
                               atol=1e-5)
    assert answer["target"] == expected[0]["class"] and answer["layer"] == "block2"
    with Image.open(io.BytesIO(base64.b64decode(answer["overlay"].split(",", 1)[1]))) as overlay:
        assert overlay.size[0] / overlay.size[1] == pytest.approx(20 / 30)  # the image's own shape


@pytest.mark.parametrize("case, status, needle", [
    ("not-an-image", 400, "notes.txt is not a readable image"),
    ("too-large", 413, "big.png is too large (0.3 MiB); the limit is 0.2 MiB"),
    ("bomb", 400, "bomb.png is too large to open safely"),
])
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server, pictures, case, status, needle):
    data, name = {"not-an-image": (b"not an image", "notes.txt"), "too-large": (b"\0" * 300_000, "big.png"),
                  "bomb": (bomb_png(), "bomb.png")}[case]
    got, answer = post(server, data, name)
    assert got == status and needle in answer["error"] and "\n" not in answer["error"]
    assert page_answers(server)
    assert post(server, pictures[0][0].read_bytes(), "picture0.png")[0] == 200


def test_unknown_paths_and_a_busy_port(server, weights):
    from vggkit.errors import VggkitError

    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(url_of(server) + "nothing", timeout=30)
    with pytest.raises(VggkitError, match="cannot listen on 127.0.0.1"):
        make_server(weights, port=server.server_address[1])


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="vggkit-chromium-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def upload(browser, server, *paths) -> list:
    """Open the page, choose `paths` in its file input, and wait for the results; the result elements."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url_of(server))
    browser.find_element(By.ID, "pick").send_keys("\n".join(str(p) for p in paths))
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "results").get_attribute("data-done"))
    return browser.find_elements(By.CSS_SELECTOR, "#results .result")


@pytest.mark.slow
def test_page_in_a_browser_shows_the_top_class_and_heatmap(browser, server, weights, pictures):
    from selenium.webdriver.common.by import By

    paths, notes = pictures
    expected = predict(weights, paths, top_k=5, compile="off")
    (card,) = upload(browser, server, paths[0])
    assert card.find_element(By.CSS_SELECTOR, ".top-class").text == expected[0]["top"][0]["class"]
    assert len(card.find_elements(By.CSS_SELECTOR, ".bars .row")) == 5
    image = card.find_element(By.TAG_NAME, "img")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0

    rows = upload(browser, server, *paths, notes)  # many at once: a table, the bad one said in its row
    assert len(rows) == 4
    assert [r.find_element(By.CSS_SELECTOR, ".top-class").text for r in rows[:3]] == \
        [e["top"][0]["class"] for e in expected]
    assert "notes.txt is not a readable image" in rows[3].find_element(By.CSS_SELECTOR, ".error").text


@pytest.mark.slow
def test_page_in_a_browser_says_a_non_image_is_not_one_and_goes_on(browser, server, weights, pictures):
    from selenium.webdriver.common.by import By

    paths, notes = pictures
    (card,) = upload(browser, server, notes)
    assert "notes.txt is not a readable image" in card.find_element(By.CSS_SELECTOR, ".error").text
    (card,) = upload(browser, server, paths[2])
    assert card.find_element(By.CSS_SELECTOR, ".top-class").text == \
        predict(weights, [paths[2]], compile="off")[0]["top"][0]["class"]


@pytest.mark.slow
def test_cli_prints_the_address_and_serves_the_page(weights):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "vggkit", "serve", str(weights)], stdout=subprocess.PIPE,
                               text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {weights} at http://127.0.0.1:") and "Ctrl-C" in line
        url = line.split(" at ", 1)[1].split()[0]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert b"Drop images here" in response.read()
    finally:
        process.terminate()
        process.wait(timeout=30)
