"""The web console in a real headless browser: Debian's chromium driven by its chromedriver through
Selenium (both from apt: `scripts/test.sh` installs the packages chromium and chromium-driver; no
browser is downloaded from anywhere else, and Selenium Manager is kept offline).

The whole in-process stack with the tiny models (cloud verifier, a real link shaper with its
control endpoint, edge node, orchestrator with a personal store). The page streams an answer with
each token coloured by its source, the demo's Cut button breaks the link mid-answer and the route
turns local while the answer completes on the device, a private document is added and listed,
and a screenshot goes to the test's output directory. Skipped, saying why, where chromium or
chromedriver is missing (run the README's test command, which installs them).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.orch_stack import Stack, hash_store_personal, local_stack

log = logging.getLogger(__name__)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SLOW_RTT_MS = 250  # each speculative round takes at least this: the answer is still streaming when Cut is pressed
WAIT_S = 20.0
VERIFIED_BEFORE_CUT = 8  # tokens verified before the link is cut (a few rounds on the chart)



def _require_browser() -> None:
    """A missing browser fails the test (never a skip): the README's test command installs it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    assert not missing, (f"{', '.join(missing)} missing: run the README's test command (scripts/test.sh installs "
                         "chromium and chromium-driver with apt-get)")


@pytest.fixture(scope="module")
def stack(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    store = tmp_path_factory.mktemp("console-store") / "store.sqlite3"
    with local_stack(tiny_models.target_hf, tiny_models.drafter_onnx, round_deadline_ms=1000, store_path=store,
                     personal=hash_store_personal(store)) as s:
        yield s


@pytest.fixture()
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager never downloads a browser or a driver
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, what: str, check: Callable[[Any], Any], timeout_s: float = WAIT_S) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:  # a list the page re-renders may go stale between two looks: look again
        return WebDriverWait(driver, timeout_s, poll_frequency=0.05,
                             ignored_exceptions=[StaleElementReferenceException]).until(check)
    except TimeoutException:
        raise AssertionError(f"waited {timeout_s} s for {what}; page error: "
                             f"{driver.find_element('id', 'error').text!r}") from None


def _text(driver: Any, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_the_console_streams_falls_back_on_a_cut_and_lists_a_private_document(
        stack: Stack, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    t0 = time.monotonic()
    browser.get(f"http://{stack.orchestrator.http_address}/")
    _wait(browser, "the link to show up", lambda d: _text(d, "link-state").startswith("up"))
    assert browser.find_element(By.ID, "demo").is_displayed()
    legend = browser.find_element(By.CLASS_NAME, "legend").text
    assert "accepted draft" in legend and "on the device" in legend

    # Slow the link through the demo control, so the answer is still streaming when the link is cut.
    rtt = browser.find_element(By.ID, "slow-rtt")
    rtt.clear()
    rtt.send_keys(str(SLOW_RTT_MS))
    browser.find_element(By.ID, "link-slow").click()
    _wait(browser, "the shaper to add the RTT", lambda d: stack.shaper.conditions.rtt_ms == SLOW_RTT_MS)

    Select(browser.find_element(By.ID, "route")).select_by_value("speculative")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("64")
    browser.find_element(By.ID, "prompt").send_keys("def add(a, b):\n    return a + b\n")
    browser.find_element(By.ID, "send").click()

    answer = _wait(browser, "an answer to start", lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[0]
    cloud_cells = ".cell.src-verified, .cell.src-target"  # accepted drafts, and the target's token ending a round
    _wait(browser, "a few verified rounds", lambda d: len(answer.find_elements(By.CSS_SELECTOR, ".cell.src-target"))
          >= VERIFIED_BEFORE_CUT // 2)
    assert browser.find_element(By.ID, "route-now").get_attribute("data-route") == "speculative"
    verified = answer.find_elements(By.CSS_SELECTOR, cloud_cells)
    colour = verified[0].value_of_css_property("background-color")

    browser.find_element(By.ID, "link-cut").click()
    _wait(browser, "the answer to finish", lambda d: answer.get_attribute("data-state") != "streaming")
    assert answer.get_attribute("data-state") == "done", answer.text
    route = browser.find_element(By.ID, "route-now")
    assert route.get_attribute("data-route") == "local", route.text
    assert "from speculative" in route.text
    local = answer.find_elements(By.CSS_SELECTOR, ".cell.src-local")
    assert local, "no token generated on the device after the cut"
    assert local[0].value_of_css_property("background-color") != colour  # the legend's colours differ
    cells = [c.get_attribute("data-source") for c in answer.find_elements(By.CSS_SELECTOR, ".cell")]
    assert len(cells) == 64 and cells == sorted(cells, key=lambda s: s == "local"), cells  # the cloud's, then local
    assert "target" in cells  # every speculative round ends with the target's own token
    spans = answer.find_elements(By.CSS_SELECTOR, ".tok")  # the text, coloured by source (the tiny model's is
    assert spans and {s.get_attribute("data-source") for s in spans} <= {"verified", "target", "local"}  # mostly unprintable)
    assert "finish" in answer.find_element(By.CSS_SELECTOR, ".meta").text
    assert _text(browser, "acceptance").endswith("%") and _text(browser, "ttft").endswith("ms")
    _wait(browser, "the status to show the cut link", lambda d: _text(d, "link-state").startswith("down"))

    browser.find_element(By.ID, "link-restore").click()
    _wait(browser, "the restored link", lambda d: stack.shaper.conditions.mode == "up"
          and stack.shaper.conditions.rtt_ms == 0)

    # A private document, added through the form and listed.
    browser.find_element(By.ID, "doc-title").send_keys("Gym <b>locker</b>")
    browser.find_element(By.ID, "doc-text").send_keys("My gym locker code is 4312.")
    Select(browser.find_element(By.ID, "doc-privacy")).select_by_value("private")
    browser.find_element(By.ID, "doc-add").click()
    listed = _wait(browser, "the document in the list", lambda d: [
        (Select(li.find_element(By.CSS_SELECTOR, "select.privacy")).first_selected_option.text,
         len(li.find_elements(By.TAG_NAME, "b")))
        for li in d.find_elements(By.CSS_SELECTOR, "#doc-list li") if "Gym <b>locker</b>" in li.text])
    assert listed == [("private", 0)]  # labelled private; the title written as text, not as markup

    # An untitled document: the console titles it with the text's first 60 characters, cut between
    # code points (a cut inside the emoji's surrogate pair was refused as a lone surrogate).
    # ChromeDriver types only the BMP, so the text is set by script.
    untitled = "x" * 59 + "\U0001F389 party notes"
    browser.execute_script("arguments[0].value = arguments[1]", browser.find_element(By.ID, "doc-text"), untitled)
    browser.find_element(By.ID, "doc-add").click()
    _wait(browser, "the untitled document in the list", lambda d: [
        li for li in d.find_elements(By.CSS_SELECTOR, "#doc-list li") if untitled[:60] in li.text])

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "console.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    log.info("console screenshot: %s", shot)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # no script error, no Content-Security-Policy violation
    assert time.monotonic() - t0 < 60


def test_the_console_asks_for_the_api_key_or_takes_it_from_the_fragment(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from tandem.security import write_secret
    from tests.support.orch_stack import fake_edge_stack

    key = "browser-key-0123456789"
    with fake_edge_stack(tmp_path / "store.sqlite3", api_key_file=write_secret(tmp_path / "key", key + "\n")) as s:
        url = f"http://{s.orchestrator.http_address}/"
        browser.get(url)  # the page loads without the key, then asks for it
        _wait(browser, "the key form", lambda d: d.find_element(By.ID, "key-form").is_displayed())
        assert _text(browser, "conn") == "API key needed"
        browser.find_element(By.ID, "key-input").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        _wait(browser, "the status with the key", lambda d: _text(d, "link-state").startswith("up"))
        assert not browser.find_element(By.ID, "key-form").is_displayed()

        browser.find_element(By.ID, "key-button").click()  # shows the key form again
        browser.find_element(By.ID, "key-forget").click()
        browser.get("about:blank")
        browser.get(url + "#key=" + key)  # the operator's link: the key in the fragment, never sent
        _wait(browser, "the status with the fragment's key", lambda d: _text(d, "link-state").startswith("up"))
        assert browser.execute_script("return location.hash") == ""
        assert browser.execute_script("return sessionStorage.getItem('tandem-api-key')") == key
        assert not browser.find_element(By.ID, "demo").is_displayed()  # no shaper control on this stack
