"""The chat page at / in a real browser: Debian's chromium + chromium-driver
(apt-get install -y chromium chromium-driver) driven by selenium, against a
live `mlxcy serve` of a tiny random-weight Qwen3.  It sends a message, sees
the reply stream in with its stats, stops a long reply with the Stop button
(the server's running count returns to zero), and saves a screenshot
(MLXCY_SCREENSHOT=path keeps it, e.g. docs/serve-chat.png)."""
import os
import shutil
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

import serve_helpers as H  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
# In CI (.ci/run sets MLXCY_REQUIRE_ASSETS=1) a missing browser fails, not skips.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and os.environ.get("CI") != "true"
    and os.environ.get("MLXCY_REQUIRE_ASSETS") != "1",
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver)")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("browser_qwen3")
    H.make_tiny_qwen3(d)
    worker, live = H.start(d, max_batch=4, max_queue=8)
    yield worker, live
    live.stop()
    worker.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1000,700"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


def _wait(fn, timeout=60, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_streams_a_reply_and_stops(srv, browser, tmp_path):
    from selenium.webdriver.common.by import By
    worker, live = srv
    browser.get(live.url + "/")
    _wait(lambda: browser.find_element(By.ID, "model-name").text == "tiny", what="model name")
    assert browser.find_element(By.ID, "model-ctx").text == "2048"

    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    temp = browser.find_element(By.ID, "temperature")
    temp.clear()
    temp.send_keys("0")
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello there, who are you?")
    browser.find_element(By.ID, "send").click()
    done = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"),
                 what="the reply")
    reply = done[0].find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    stats = done[0].find_element(By.CSS_SELECTOR, ".stats").text
    assert "TTFT" in stats and "tok/s" in stats and "24 generated" in stats
    assert "finish: length" in stats
    # the page shows what the API gives for the same request
    import openai
    c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model="tiny", max_tokens=24, temperature=0,
                                  messages=[{"role": "user",
                                             "content": "Hello there, who are you?"}])
    assert reply == r.choices[0].message.content
    shot = os.environ.get("MLXCY_SCREENSHOT") or str(tmp_path / "chat.png")
    browser.save_screenshot(shot)
    assert os.path.getsize(shot) > 1000

    # a long reply, stopped from the page: the server frees its row
    max_tokens.clear()
    max_tokens.send_keys("1500")
    box.send_keys("Tell me a very long story.")
    browser.find_element(By.ID, "send").click()
    _wait(lambda: worker.num_running == 1, what="the second reply to start")
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
          and browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
          .find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent"),
          what="streamed text")
    browser.find_element(By.ID, "stop").click()
    last = _wait(lambda: [m for m in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")
                          if "finish: stopped" in m.text], what="the stopped reply")
    assert last
    _wait(lambda: worker.live == 0 and worker.num_running == 0, timeout=30,
          what="the server to free the row")
