"""The chat page in headless Chromium: type, watch tokens stream in, stop, start over.

Uses Debian's chromium + chromedriver (scripts/install-test-deps.sh installs them); nothing is
downloaded at run time. The message carries FAULT_SLOW_MARKER so the shared server streams it
slowly enough to press Stop mid-answer. Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import MODEL_NAME, REPO, wait_for_metrics

from zili.serve.engine_worker import FAULT_SLOW_MARKER

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium + chromedriver: run scripts/install-test-deps.sh")
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,800", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_and_stops(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(server.url + "/")
    wait.until(ready.text_to_be_present_in_element((By.ID, "model-name"), MODEL_NAME))
    assert browser.title == "zili chat"

    # a normal answer runs to its end and reports its speed
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys("8")
    browser.find_element(By.ID, "input").send_keys("Hello there")
    browser.find_element(By.ID, "send").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "stats"), "tokens/s"))
    wait.until(ready.element_to_be_clickable((By.ID, "send")))
    answers = browser.find_elements(By.CSS_SELECTOR, ".assistant .content")
    assert len(answers) == 1 and answers[0].text.strip()

    # a slow answer: text appears token by token, Stop ends it
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "input").send_keys(f"{FAULT_SLOW_MARKER} tell me more")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .content")) == 2
               and d.find_elements(By.CSS_SELECTOR, ".assistant .content")[1].text.strip())
    assert browser.find_element(By.ID, "stop").is_enabled()
    assert not browser.find_element(By.ID, "send").is_enabled()
    browser.save_screenshot(str(ARTIFACTS / "chat_page_streaming.png"))
    browser.find_element(By.ID, "stop").click()
    wait.until(ready.element_to_be_clickable((By.ID, "send")))
    assert not browser.find_element(By.ID, "stop").is_enabled()
    stopped_text = browser.find_elements(By.CSS_SELECTOR, ".assistant .content")[1].text
    assert stopped_text.strip() and "[" not in stopped_text[-1:]  # no error appended
    browser.save_screenshot(str(ARTIFACTS / "chat_page_stopped.png"))
    # the server saw the client leave and freed the request
    wait_for_metrics(server.url, lambda m: m["zili_http_requests_running"] == 0 and m["zili_engine_num_running"] == 0)

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    assert browser.get_log("browser") == [] or all(e["level"] != "SEVERE" for e in browser.get_log("browser"))
