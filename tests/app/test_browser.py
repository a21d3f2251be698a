"""The search page end to end in headless Chromium: type a query, see thumbnails, follow "more like
this", upload an image. A screenshot is kept in build/test-artifacts/ (Debian chromium and
chromium-driver, installed by `make install`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as when
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import png_bytes, serving, settings_for

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "install Debian chromium and chromium-driver (make install does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _cards(browser, count_at_least: int = 1):
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) >= count_at_least)
    return browser.find_elements(By.CSS_SELECTOR, ".card")


def _requests(base: str) -> dict[str, float]:
    """Successful requests per route, from the server's Prometheus counters."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("clipsearch_requests_total{") and 'status="200"' in line:
            route = line.split('route="', 1)[1].split('"', 1)[0]
            counts[route] = counts.get(route, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_search_page(browser, live_server: str, tmp_path: Path) -> None:
    browser.get(f"{live_server}/")
    box = WebDriverWait(browser, 30).until(when.presence_of_element_located((By.ID, "query")))
    box.send_keys("a red circle", Keys.ENTER)
    cards = _cards(browser, 24)
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert "results for \"a red circle\"" in browser.find_element(By.ID, "status").text
    captions = [c.find_element(By.CSS_SELECTOR, ".caption").text for c in cards]
    assert all(caption for caption in captions)
    # the next page (the index holds 40 items), appended below; then there is no further page
    more = browser.find_element(By.ID, "more")
    assert more.is_displayed()
    more.click()
    assert len(_cards(browser, 40)) == 40
    WebDriverWait(browser, 30).until(lambda b: not b.find_element(By.ID, "more").is_displayed())
    assert "40 results for \"a red circle\"" in browser.find_element(By.ID, "status").text
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")

    cards[0].find_element(By.CSS_SELECTOR, "button.more").click()
    WebDriverWait(browser, 30).until(lambda b: "images like" in b.find_element(By.ID, "status").text)
    first_score = float(_cards(browser)[0].find_element(By.CSS_SELECTOR, ".meta span").text)
    assert first_score > 0.99  # the item itself ranks first

    # an uploaded image is embedded once, and its pages are searches by that vector
    before = _requests(live_server)
    upload = tmp_path / "query.png"
    upload.write_bytes(png_bytes((30, 60, 220), (48, 48)))
    browser.find_element(By.ID, "file").send_keys(str(upload))
    WebDriverWait(browser, 30).until(lambda b: "24 results for images like query.png" in
                                     b.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "more").click()
    WebDriverWait(browser, 30).until(lambda b: "40 results for images like query.png" in
                                     b.find_element(By.ID, "status").text)
    after = _requests(live_server)
    calls = {route: after.get(route, 0) - before.get(route, 0) for route in after}
    assert (calls.get("/v1/embed/image"), calls.get("/v1/search"), calls.get("/v1/search/image", 0)) == (1, 2, 0)
    shown = [c.find_element(By.CSS_SELECTOR, ".caption").text for c in _cards(browser, 40)]
    reference = httpx.post(f"{live_server}/v1/search/image", files={"file": upload.read_bytes()},
                           data={"k": "40"}).json()["results"]  # the same file as an image search
    assert shown == [hit.get("caption") or hit["source"] for hit in reference]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "search-page.png"))


def test_search_page_on_a_server_with_api_keys(browser, index_dir: Path, app_encoder) -> None:
    """A 401 brings up the key field; with the key the search and its thumbnails load."""
    with serving(settings_for(index_dir, api_keys=["k1"]), app_encoder) as base:
        browser.get(f"{base}/")
        browser.execute_script("sessionStorage.clear()")
        browser.get(f"{base}/")
        key = browser.find_element(By.ID, "key")
        assert not key.is_displayed()
        browser.find_element(By.ID, "query").send_keys("a red circle", Keys.ENTER)
        WebDriverWait(browser, 30).until(lambda b: "needs an API key" in b.find_element(By.ID, "status").text)
        assert key.is_displayed() and not browser.find_elements(By.CSS_SELECTOR, ".card")
        key.send_keys("k1", Keys.ENTER)
        _cards(browser, 24)
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert browser.find_element(By.ID, "more").is_displayed()
