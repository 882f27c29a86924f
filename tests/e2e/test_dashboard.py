"""``/dashboard`` in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven through chromedriver by Selenium): the page loads
under its strict CSP, takes the admin key, opens the live feed and shows queue
numbers change while a load runs. A screenshot is written to
``tests/artifacts/dashboard.png``. ``make test`` installs the browser first (as
root); without it the test skips and says why."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.e2e.conftest import HTTP_TIMEOUT, Launcher, ServerProcess

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
#: Seconds the page has for each thing it must show (a hang guard, not a measure).
PAGE_TIMEOUT = 20.0
#: Requests of the load: with one slot and half a second each, most of them queue.
LOAD = 8

DASHBOARD_BACKEND = """
[[backends]]
name = "slow"
kind = "scripted"
models = ["slow"]
chunks = 5
chunk_delay = 0.1
max_concurrency = 1
max_queue = 32
"""


def _browser() -> tuple[str, str]:
    chromedriver = shutil.which("chromedriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromedriver is None or chromium is None:
        pytest.skip(
            "chromium and chromedriver are not installed (`make browser` installs the "
            "Debian packages chromium and chromium-driver, as root)"
        )
    return chromium, chromedriver


@pytest.fixture(scope="module")
def dashboard_server(launch_server: Launcher) -> ServerProcess:
    return launch_server("dashboard", DASHBOARD_BACKEND)


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, chromedriver = _browser()
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        # The path is given: Selenium Manager never looks for (or downloads) a driver.
        service = webdriver.ChromeService(executable_path=chromedriver)
        driver = webdriver.Chrome(options=options, service=service)
        try:
            yield driver
        finally:
            driver.quit()


def test_dashboard_files_carry_a_strict_csp(dashboard_server: ServerProcess) -> None:
    with httpx2.Client(base_url=dashboard_server.root_url, timeout=HTTP_TIMEOUT) as http:
        page = http.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        html = page.text
        assert '<script src="/dashboard.js"' in html and "<script>" not in html
        assert "style=" not in html and "http://" not in html and "https://" not in html
        for path, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
            asset = http.get(path)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert asset.headers["x-content-type-options"] == "nosniff"
        assert "innerHTML" not in http.get("/dashboard.js").text


def _load(server: ServerProcess, done: threading.Event, failures: list[str]) -> None:
    """``LOAD`` chat requests at once, each on its own connection."""

    def one() -> None:
        try:
            with httpx2.Client(timeout=HTTP_TIMEOUT) as http:
                response = http.post(
                    f"{server.base_url}/chat/completions",
                    headers={"authorization": f"Bearer {server.key}"},
                    content=orjson.dumps(
                        {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
                    ),
                )
            if response.status_code != 200:
                failures.append(f"{response.status_code}: {response.text[:200]}")
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(LOAD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()


def test_dashboard_shows_the_queue_move(dashboard_server: ServerProcess, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.05)
    browser.get(f"{dashboard_server.root_url}/dashboard")
    key = browser.find_element(By.ID, "key")
    key.send_keys(dashboard_server.key)
    browser.find_element(By.ID, "connect-button").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "live")
    assert dashboard_server.key not in browser.current_url

    def text(field: str) -> str | None:
        # Read in one script call: the page redraws its cards with every snapshot.
        script = "const e = document.querySelector(arguments[0]); return e && e.textContent;"
        value: str | None = browser.execute_script(
            script, f'[data-backend="slow"] [data-field="{field}"]'
        )
        return value

    def number(field: str) -> int:
        value = text(field)
        return int(value) if value is not None else -1

    wait.until(lambda d: text("queued") is not None)
    assert (number("queued"), number("running")) == (0, 0)

    done = threading.Event()
    failures: list[str] = []
    load = threading.Thread(target=_load, args=(dashboard_server, done, failures))
    load.start()
    try:
        wait.until(lambda d: number("queued") >= 2 and number("running") == 1)
        principals = browser.execute_script(
            "return document.querySelectorAll('[data-backend=\"slow\"] [data-principal]').length"
        )
        assert principals, "no per-principal row while requests queue"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        print(f"dashboard screenshot: {shot}")
        seen = {number("queued")}

        def moved(_: Any) -> bool:
            seen.add(number("queued"))
            return len(seen) >= 2

        wait.until(moved)
    finally:
        load.join(timeout=4 * HTTP_TIMEOUT)
    assert done.is_set() and not failures, failures
    wait.until(lambda d: (number("queued"), number("running")) == (0, 0))
    assert text("wait_p50") not in (None, "\u2013")
    # The requests that ended are listed, newest first, as text.
    wait.until(
        lambda d: (
            d.execute_script("return document.querySelectorAll('#recent [data-request-id]').length")
            > 0
        )
    )
    status = browser.execute_script(
        "return document.querySelector('#recent [data-request-id] td.num').textContent"
    )
    assert status == "200"
    messages = [entry["message"] for entry in browser.get_log("browser")]
    assert not [m for m in messages if "Content Security Policy" in m], messages
