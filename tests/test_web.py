"""The try-a-recipe page (serve/web/index.html, served at GET /) in a real browser: Debian's
chromium, headless, driven by selenium against the app on 127.0.0.1 (tiny base, platform adapters,
tenants acme and beta). `make browser` installs chromium and chromedriver; `make test` runs it."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import requests

from tests.serve_fixture import make_mp4, running_app

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 120
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:  # not a skip: the page's test belongs to `make test`, which installs them
        pytest.fail(
            f"{' and '.join(missing)} not found: run `make browser` (installs Debian's chromium and "
            "chromium-driver; `make test` does it too)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # The driver given explicitly: Selenium Manager never runs (it would try to download one).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def app(browser, ray_cluster, tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("web")) as app:
        yield app


@pytest.fixture
def page(browser, app):
    """The page freshly opened at desktop size, its session storage empty."""
    browser.set_window_size(1280, 900)
    browser.get(app.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(app.url + "/")
    assert browser.title == "ddft — recipe from a cooking video"
    return browser


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
        lambda d: condition(d), message=f"waited {WAIT_S}s for {what}; error box: {error_text(driver)!r}"
    )


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def error_text(driver) -> str:
    box = by_id(driver, "error")
    return box.text if box.is_displayed() else ""


def text_of(driver, element_id: str) -> str:
    """textContent: also for what a closed <details> hides (Selenium's .text is only what shows)."""
    return by_id(driver, element_id).get_attribute("textContent")


def submit_and_wait(driver) -> None:
    by_id(driver, "submit").click()
    wait(driver, lambda d: by_id(d, "result").is_displayed() or by_id(d, "error").is_displayed(), "an answer")
    assert not by_id(driver, "progress").is_displayed()
    assert by_id(driver, "submit").is_enabled()


def shown_recipe(driver) -> dict:
    from selenium.webdriver.common.by import By

    rows = by_id(driver, "ingredients").find_elements(By.CSS_SELECTOR, "tbody tr")
    return {
        "adapter": text_of(driver, "adapter-used"),
        "base": text_of(driver, "base-used"),
        "ingredients": [[td.get_attribute("textContent") for td in r.find_elements(By.TAG_NAME, "td")] for r in rows],
        "steps": [li.get_attribute("textContent") for li in by_id(driver, "steps").find_elements(By.TAG_NAME, "li")],
        "text": text_of(driver, "raw-text"),
        "timings": {
            box.get_attribute("data-key")
            for box in by_id(driver, "timings").find_elements(By.CSS_SELECTOR, "div[data-key]")
        },
    }


def test_upload_shows_the_recipe_the_api_returns(page, app, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(make_mp4())
    by_id(page, "video").send_keys(str(video))
    assert "clip.mp4" in by_id(page, "video-name").text
    submit_and_wait(page)
    assert not by_id(page, "error").is_displayed(), error_text(page)
    shown = shown_recipe(page)

    resp = requests.post(f"{app.url}/v1/recipes", files={"video": ("clip.mp4", video.read_bytes())}, timeout=120)
    assert resp.status_code == 200, resp.text
    api = resp.json()
    assert shown["adapter"] == api["adapter"] == "ddft/video/v1"
    assert shown["base"] == api["base"] and shown["base"]
    assert shown["text"] == api["text"]  # greedy decoding: the same video gives the same text
    assert shown["steps"] == api["steps"]
    assert [[name, unit] for name, _, unit in shown["ingredients"]] == [
        [i["name"], i["unit"] or ""] for i in api["ingredients"]
    ]
    for (_, quantity, _), ing in zip(shown["ingredients"], api["ingredients"]):
        assert (
            (quantity == "")
            if ing["quantity"] is None
            else float(sum(Fraction(part) for part in quantity.split())) == pytest.approx(ing["quantity"], abs=1e-3)
        )
    assert by_id(page, "ingredients").tag_name == "table" and by_id(page, "steps").tag_name == "ol"
    assert {"decode_s", "generate_s", "total_s"} <= shown["timings"]
    assert {k for k in ("queue_s", "batch_size") if k in api["timings"]} <= shown["timings"]
    timings = by_id(page, "timings").text
    assert "total" in timings and "decode" in timings and "generate" in timings
    details = page.find_element("css selector", "details")
    assert details.get_attribute("open") is None  # the raw text is collapsed until asked for
    details.find_element("tag name", "summary").click()
    assert by_id(page, "raw-text").is_displayed()


def test_an_undecodable_file_shows_the_api_error(page, tmp_path):
    bad = tmp_path / "noise.mp4"
    bad.write_bytes(np.random.default_rng(7).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    by_id(page, "video").send_keys(str(bad))
    submit_and_wait(page)
    box = by_id(page, "error")
    assert box.is_displayed() and box.get_attribute("role") == "alert"
    assert by_id(page, "error-code").text == "undecodable_video"
    assert by_id(page, "error-detail").text  # the API's detail, shown as it came
    assert not by_id(page, "result").is_displayed()


def test_no_video_is_an_error_without_a_request(page):
    by_id(page, "submit").click()
    assert by_id(page, "error").is_displayed() and by_id(page, "error-code").text == "missing_video"


def test_a_key_lists_the_tenants_video_adapters_and_is_used(page, app):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    key_field = by_id(page, "api-key")
    assert key_field.get_attribute("type") == "password"
    key_field.send_keys(app.keys["acme"], Keys.ENTER)  # Enter applies the key; it does not submit
    wait(page, lambda d: "Key accepted" in by_id(d, "key-status").text, "the key to be checked")
    assert "1 adapter(s) of your own" in by_id(page, "key-status").text  # acme's text adapter
    select = Select(by_id(page, "adapter"))
    values = [o.get_attribute("value") for o in select.options]
    assert values[0] == "" and select.first_selected_option.text == "Automatic routing"
    assert "ddft/video/v1" in values
    assert "tenant-acme/text/v1" not in values and "ddft/text/v1" not in values  # not for videos
    assert not by_id(page, "error").is_displayed()
    assert page.execute_script("return sessionStorage.getItem('ddft.apiKey')") == app.keys["acme"]
    assert page.execute_script("return localStorage.length") == 0

    # The chosen adapter and max tokens go with the request, under the tenant's key.
    select.select_by_value("ddft/video/v1")
    by_id(page, "max-tokens").send_keys("3")
    by_id(page, "video-uri").send_keys("datasets/raw/clips/one.mp4")
    submit_and_wait(page)
    assert not by_id(page, "error").is_displayed(), error_text(page)
    assert text_of(page, "adapter-used") == "ddft/video/v1"

    # A wrong key is the API's 401, shown in the alert box.
    key_field.clear()
    key_field.send_keys("not-a-key", Keys.ENTER)
    wait(page, lambda d: by_id(d, "error").is_displayed(), "the bad key's error")
    assert by_id(page, "error-code").text == "bad_key"


def test_narrow_screen_has_no_sideways_scroll(page):
    page.set_window_size(360, 740)
    by_id(page, "video-uri").send_keys("datasets/raw/clips/one.mp4")
    submit_and_wait(page)
    assert not by_id(page, "error").is_displayed(), error_text(page)
    assert text_of(page, "adapter-used") == "ddft/video/v1"
    width = page.execute_script("return window.innerWidth")
    assert width <= 400
    assert page.execute_script("return document.documentElement.scrollWidth") <= width
    for element_id in ("video", "api-key", "adapter", "max-tokens", "submit", "ingredients", "timings"):
        rect = by_id(page, element_id).rect
        assert rect["x"] >= 0 and rect["x"] + rect["width"] <= width + 1, (element_id, rect)


def test_a_full_recipe_renders_as_text(page):
    """The tiny base writes noise; a canned answer (fetch stubbed in the page) shows the table, the
    numbered steps and quantities as recipes write them, and markup in the text stays text."""
    canned = {
        "ingredients": [
            {"name": "flour", "quantity": 2.0, "unit": "cup"},
            {"name": "milk", "quantity": 1.75, "unit": "cup"},
            {"name": "salt", "quantity": 0.3, "unit": "tsp"},
            {"name": "<b>eggs</b>", "quantity": None, "unit": None},
        ],
        "steps": ["Whisk <i>everything</i>.", "Bake 20 minutes."],
        "text": "Ingredients: <script>x</script>",
        "adapter": "ddft/video/v1",
        "base": "tiny",
        "timings": {"decode_s": 0.1, "generate_s": 1.5, "total_s": 1.7, "queue_s": 0.01, "batch_size": 2},
    }
    page.execute_script(
        """const canned = arguments[0], real = window.fetch;
        window.fetch = (url, opts) => String(url).endsWith('v1/recipes')
          ? Promise.resolve(new Response(JSON.stringify(canned), {headers: {'Content-Type': 'application/json'}}))
          : real(url, opts);""",
        canned,
    )
    by_id(page, "video-uri").send_keys("datasets/raw/clips/one.mp4")
    submit_and_wait(page)
    shown = shown_recipe(page)
    assert shown["ingredients"] == [
        ["flour", "2", "cup"],
        ["milk", "1 3/4", "cup"],
        ["salt", "0.3", "tsp"],
        ["<b>eggs</b>", "", ""],
    ]
    assert shown["steps"] == canned["steps"] and shown["text"] == canned["text"]
    assert shown["timings"] == {"decode_s", "generate_s", "total_s", "queue_s", "batch_size"}
    assert "batch size\n2" in by_id(page, "timings").text
    assert not by_id(page, "no-ingredients").is_displayed() and not by_id(page, "no-steps").is_displayed()


def test_the_latest_eval_chart_shows_when_there_is_one(page, app):
    """The evaluation section stays hidden while GET /eval/latest.png is 404, and shows the newest
    chart `ddft eval` saved (full width of the card, no sideways scroll) once there is one."""
    from ddft.eval import chart

    loaded = "return document.getElementById('eval-chart').complete"
    wait(page, lambda d: d.execute_script(loaded), "the chart request to end")
    assert not by_id(page, "eval").is_displayed()  # 404 no_eval_chart: nothing to show
    app.store.write_bytes("eval/20261130-120000.png", chart.png([], "2026-11-30 12:00:00 UTC"))
    try:
        page.get(app.url + "/")
        wait(page, lambda d: by_id(d, "eval").is_displayed(), "the evaluation chart")
        assert page.execute_script("return document.getElementById('eval-chart').naturalWidth") == 1200
        card = by_id(page, "eval").rect
        assert by_id(page, "eval-chart").rect["width"] <= card["width"]
        assert page.execute_script("return document.documentElement.scrollWidth") <= page.execute_script(
            "return window.innerWidth"
        )
    finally:
        app.store.delete("eval")
