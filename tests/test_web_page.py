"""The web page at ``/``, in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium, against a real server running the tiny model.

Each browser test uploads a real photo (downscaled, so the tiny model stays fast on one core)
and waits for what a person would see. Without Chromium the browser tests skip with a reason.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.conftest import FIXTURES, RedisServer, free_port
from tests.live import live_server

PHOTO = FIXTURES / "images" / "108005.jpg"
WAIT_S = 120


def serve(registry: Path, **overrides: Any) -> Settings:
    return Settings(registry=registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=2,
                    **overrides)


@pytest.fixture(scope="module")
def url(tiny_registry: Path) -> Iterator[str]:
    with live_server(serve(tiny_registry), torch_threads=1) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver (.ci/run does, as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photo, 64 pixels wide: a few tiles of the tiny model."""
    path = tmp_path_factory.mktemp("photo") / "lake.jpg"
    with Image.open(PHOTO) as img:
        img.resize((64, round(64 * img.height / img.width)), Image.Resampling.LANCZOS).save(path, quality=95)
    return path


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def wait(driver: Any, condition: Callable[[Any], bool]) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(condition)


def upload(driver: Any, base: str, image: Path) -> None:
    """Open the page, choose ``image`` and press Upscale; returns once a result or an error shows."""
    driver.get(base + "/")
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")
    by_id(driver, "file").send_keys(str(image))
    by_id(driver, "submit").click()
    wait(driver, lambda d: by_id(d, "result").is_displayed() or by_id(d, "error").is_displayed())


def result_size(driver: Any) -> tuple[int, int]:
    after = by_id(driver, "after")
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", after))


def shown(element: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"), dtype=np.int16)


def test_page_assets_and_config_are_served(url: str) -> None:
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/web/app.js"' in page.text and "://" not in page.text  # nothing from elsewhere
    for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{url}/web/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
    missing = httpx.get(url + "/web/secret.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(url + "/ui-config").json() == {"auth_required": False, "jobs": False}


def test_upscales_a_photo_with_a_comparison_slider(browser: Any, url: str, photo: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    upload(browser, url, photo)
    assert by_id(browser, "result").is_displayed(), by_id(browser, "error").text
    width, height = Image.open(photo).size
    assert result_size(browser) == (4 * width, 4 * height)
    canvas = by_id(browser, "before")
    assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (4 * width, 4 * height)
    download = by_id(browser, "download")
    assert download.get_attribute("href").startswith("blob:") and download.get_attribute("download") == "lake_x4.jpg"
    assert "tiny:1" in by_id(browser, "result-info").text

    compare = by_id(browser, "compare")
    halfway = shown(compare)
    by_id(browser, "slider").send_keys(Keys.END)  # the keyboard moves the divider: all bicubic
    all_bicubic = shown(compare)
    assert all_bicubic.shape == halfway.shape
    changed = np.abs(all_bicubic - halfway).max(axis=2) > 16
    assert changed[:, : changed.shape[1] // 2 - 4].mean() < 0.01, "the left half showed bicubic already"
    assert changed[:, changed.shape[1] // 2 + 4 :].mean() > 0.3, "moving the slider did not change the right half"

    browser.set_window_size(390, 844)  # a phone: no sideways scrolling
    try:
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        browser.set_window_size(1280, 1100)


def test_bad_file_shows_the_error_in_plain_words(browser: Any, url: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(PHOTO.read_bytes()[:600])  # a JPEG cut short
    upload(browser, url, broken)
    error = by_id(browser, "error")
    assert error.is_displayed() and not by_id(browser, "result").is_displayed()
    assert "could not be read as an image" in error.text and "(bad_request)" in error.text, error.text


def test_asks_for_the_api_key(browser: Any, tiny_registry: Path, photo: Path) -> None:
    with live_server(serve(tiny_registry, api_keys="right-key"), torch_threads=1) as base:
        assert httpx.get(base + "/ui-config").json()["auth_required"] is True
        upload(browser, base, photo)  # no key yet: 401, said plainly, and the key field is focused
        assert "valid API key" in by_id(browser, "error").text
        key = by_id(browser, "api-key")
        assert key.is_displayed() and browser.switch_to.active_element == key
        key.send_keys("right-key\n")
        by_id(browser, "submit").click()
        wait(browser, lambda d: by_id(d, "result").is_displayed())
        width, height = Image.open(photo).size
        assert result_size(browser) == (4 * width, 4 * height)
        browser.get(base + "/")  # the key stays for the tab's session
        assert by_id(browser, "api-key").get_attribute("value") == "right-key"


def test_large_image_goes_through_a_job(browser: Any, tiny_registry: Path, photo: Path, redis_server: RedisServer) -> None:
    # max_queue 2: the photo's tiles are more than a synchronous request may queue → 413 too_large_for_sync.
    settings = serve(tiny_registry, redis_url=redis_server.url, max_queue=2)
    with live_server(settings, torch_threads=1) as base:
        assert httpx.get(base + "/ui-config").json()["jobs"] is True
        upload(browser, base, photo)
        assert by_id(browser, "result").is_displayed(), by_id(browser, "error").text
        assert "background job" in by_id(browser, "result-info").text
        width, height = Image.open(photo).size
        assert result_size(browser) == (4 * width, 4 * height)


def test_too_large_without_a_job_queue_says_what_to_do(browser: Any, tiny_registry: Path, photo: Path) -> None:
    """No job queue (a default `vpdsr serve`): a 413 too_large_for_sync names what works instead,
    not only "try a smaller image". (max_queue 1 makes the photo too large whatever the speed.)"""
    with live_server(serve(tiny_registry, max_queue=1), torch_threads=1) as base:
        upload(browser, base, photo)
        assert by_id(browser, "error").is_displayed()
        said = by_id(browser, "error").text
        assert "vpdsr upscale" in said and "job queue" in said, said
        detail = by_id(browser, "error-detail").text
        assert "too_large_for_sync" in detail and "`vpdsr upscale INPUT OUTPUT`" in detail, detail
        assert "up to about" in detail, detail
