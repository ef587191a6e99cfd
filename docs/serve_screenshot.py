"""Make docs/serve.png: `vggkit serve RUN` in headless Chromium after IMAGE was chosen.

    python docs/serve_screenshot.py runs/fashion shoe.png docs/serve.png

Needs the dev extra (selenium) and Debian's chromium and chromium-driver.
"""
import shutil
import sys
import tempfile
import threading

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from vggkit.serve import make_server, url_of

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=960,640"]


def main(run: str, image: str, out: str) -> None:
    server = make_server(run)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tempfile.mkdtemp(prefix="vggkit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url_of(server))
        driver.find_element(By.ID, "pick").send_keys(image)
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "results").get_attribute("data-done"))
        print(driver.find_element(By.CSS_SELECTOR, "#results .top-class").text)
        driver.save_screenshot(out)
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
