"""The chat page at / (minicpm4/serve/static/chat.html) in headless Chromium: Debian's `chromium` and
`chromium-driver` packages, driven by Selenium through that chromedriver (Selenium Manager is never used,
nothing is downloaded). .ci/run installs them. Without them the tests never pass silently: under CI=true (as
.ci/run runs) they fail; elsewhere they skip, with a reason naming the missing binary (pytest's -ra summary lists it).

The page's replies are checked against what the same server answers greedily through the openai client
for the same messages, asked before or after the page's own request, never at the same time."""

import os
import shutil
import time

import httpx2 as httpx  # the HTTP client the openai package is built on here
import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from server_util import running_server

from minicpm4.serve.llm import LLM

INSTALL = ("headless Chromium is needed for the chat page tests: install Debian's chromium with "
           "`apt-get install -y chromium chromium-driver` (.ci/run does this)")
WAIT = 180  # seconds; generous, the CI machine's 2 cores are shared


@pytest.fixture(scope="module")
def server(model_tok):
    with running_server(LLM(*model_tok, max_len=1024), tool_format="json") as (url, srv):
        yield url, srv


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium session. Requested before the server, so a missing browser skips (or, in CI, fails)
    before the model loads."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        missing = " and ".join(name for name, path in (("chromium", chromium), ("chromedriver", driver_path))
                               if not path)
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"{missing} not found on PATH: {INSTALL}")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser, url: str):
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "prompt").is_enabled())
    browser.execute_script("document.getElementById('settings').open = true")
    return browser


def set_field(driver, element_id: str, value) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def ask(driver, text: str) -> None:
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)  # Enter sends


def assistants(driver):
    return driver.find_elements(By.CSS_SELECTOR, '#messages [data-role="assistant"]')


def wait_done(driver, count: int):
    """The count-th assistant message, once its reply has ended."""
    def done(d):
        msgs = assistants(d)
        return len(msgs) >= count and msgs[count - 1].get_attribute("data-done") == "true" and msgs[count - 1]
    return WebDriverWait(driver, WAIT).until(done)


def body_text(message) -> str:
    return message.find_element(By.CSS_SELECTOR, ".body").get_property("textContent")


def greedy(url: str, messages: list[dict], max_tokens: int, api_key: str = "unused") -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)
    r = client.chat.completions.create(model="test-model", messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def test_page_is_self_contained(server):
    html = httpx.get(server[0] + "/").text
    assert 'id="prompt"' in html and 'id="send"' in html and 'id="stop"' in html and 'id="messages"' in html
    assert "http://" not in html and "https://" not in html and "<link" not in html and "src=" not in html
    assert "innerHTML" not in html


def test_page_streams_the_greedy_answer_and_keeps_history(browser, server):
    url = server[0]
    d = open_page(browser, url)
    system, first, second, n = "You are a helpful assistant.", "What is the capital of France?", "And of Italy?", 24
    set_field(d, "system", system)
    set_field(d, "temperature", 0)
    set_field(d, "max-tokens", n)

    prompt = d.find_element(By.ID, "prompt")  # Shift+Enter is a new line, not a send
    prompt.send_keys("a", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "b")
    assert prompt.get_property("value") == "a\nb" and not assistants(d)
    prompt.clear()

    start = time.perf_counter()
    ask(d, first)
    reply1 = body_text(wait_done(d, 1))
    ask(d, second)  # the second request carries the first exchange
    done2 = wait_done(d, 2)
    reply2 = body_text(done2)
    page_s = time.perf_counter() - start
    stats = done2.find_element(By.CSS_SELECTOR, ".stats").text
    assert "tokens/s" in stats and "stopped" not in stats, stats
    assert d.find_element(By.ID, "send").is_enabled() and not d.find_element(By.ID, "stop").is_enabled()
    assert [m.get_attribute("data-role") for m in d.find_elements(By.CSS_SELECTOR, "#messages .msg")] == \
        ["user", "assistant", "user", "assistant"]
    assert d.find_elements(By.CSS_SELECTOR, '#messages [data-role="user"] .body')[1].text == second

    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    assert reply1 == greedy(url, turn1, n)
    turn2 = turn1 + [{"role": "assistant", "content": reply1}, {"role": "user", "content": second}]
    assert reply2 == greedy(url, turn2, n)
    assert reply1 and reply2, "the model said nothing: the comparison proves little"
    print(f"page: two replies in {page_s:.1f} s")


def test_stop_ends_a_long_reply_early(browser, server):
    url, srv = server
    d = open_page(browser, url)
    limit = 900
    set_field(d, "temperature", 0)
    set_field(d, "max-tokens", limit)
    ask(d, "Count from 1 to 1000, one number per line.")
    WebDriverWait(d, WAIT).until(lambda d: assistants(d) and len(body_text(assistants(d)[0])) >= 5)
    d.find_element(By.ID, "stop").click()
    message = wait_done(d, 1)
    assert message.get_attribute("data-stopped") == "true"
    stats = message.find_element(By.CSS_SELECTOR, ".stats").text
    assert "stopped" in stats, stats
    assert int(stats.split(" token")[0]) < limit, stats
    assert d.find_element(By.ID, "send").is_enabled() and not d.find_element(By.ID, "stop").is_enabled()
    deadline = time.time() + 10  # the aborted fetch cancels the request on the server and frees its slot
    while srv.engine.running or srv.engine.queued:
        assert time.time() < deadline, "the server kept generating after Stop"
        time.sleep(0.1)


def test_page_shows_the_server_error(browser, server):
    d = open_page(browser, server[0])
    set_field(d, "max-tokens", 100000)  # above the server's limit (4096)
    ask(d, "Hello?")
    error = WebDriverWait(d, WAIT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#messages [data-role="error"]'))[0]
    assert "max_tokens=100000 is above this server's limit of 4096" in error.text, error.text
    assert "400" in error.text
    assert not assistants(d)  # the failed turn is dropped, its text given back for another try
    assert d.find_element(By.ID, "prompt").get_property("value") == "Hello?"
    assert d.find_element(By.ID, "send").is_enabled()


def test_api_key_is_sent_and_kept(browser, model_tok):
    with running_server(LLM(*model_tok, max_len=1024), api_key="s3cret", tool_format="json") as (url, _):
        d = open_page(browser, url)
        set_field(d, "temperature", 0)
        set_field(d, "max-tokens", 4)
        ask(d, "Hi")
        error = WebDriverWait(d, WAIT).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '#messages [data-role="error"]'))[0]
        assert "401" in error.text and "API key" in error.text, error.text

        set_field(d, "api-key", "s3cret")
        d.find_element(By.ID, "prompt").click()  # the key field's change event stores the key
        d.find_element(By.ID, "prompt").send_keys(Keys.ENTER)  # the prompt was given back after the 401
        reply = body_text(wait_done(d, 1))
        assert reply == greedy(url, [{"role": "user", "content": "Hi"}], 4, api_key="s3cret")

        d.refresh()
        assert d.find_element(By.ID, "api-key").get_property("value") == "s3cret"
        WebDriverWait(d, 30).until(  # /v1/models answered with the stored key
            lambda d: d.find_element(By.ID, "model-name").text == "test-model")


FAKE_STREAM = """
// Replaces fetch for /v1/chat/completions with an SSE body cut into 1-3 byte reads: lines, \\r\\n pairs
// and multi-byte characters split across reads, a comment, a usage chunk, data after [DONE].
const [pieces, tail] = arguments;
const chunk = (delta) => JSON.stringify({choices: [{index: 0, delta, finish_reason: null}]});
let text = "data: " + chunk({role: "assistant", content: ""}) + "\\r\\n\\r\\n: keep-alive\\n\\n";
pieces.forEach((p, i) => { text += "data: " + chunk({content: p}) + ["\\n\\n", "\\r\\n\\r\\n", "\\r\\r"][i % 3]; });
text += tail;
const bytes = new TextEncoder().encode(text);
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  if (!String(url).endsWith("/v1/chat/completions")) return realFetch(url, init);
  window.__sent = JSON.parse(init.body);
  let at = 0;
  const body = new ReadableStream({pull(c) {
    if (at >= bytes.length) { c.close(); return; }
    const n = 1 + (at % 3); c.enqueue(bytes.slice(at, at + n)); at += n;
  }});
  return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};
"""


def test_sse_split_anywhere_and_rendered_as_text(browser, server):
    d = open_page(browser, server[0])
    pieces = ["Caf\u00e9 ", "\u4e16\u754c \U0001F642", " <b>not bold</b>", " &amp;\n", "<img src=x onerror=alert(1)>"]
    usage = '{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}'
    d.execute_script(FAKE_STREAM, pieces, f"data: {usage}\n\ndata: [DONE]\n\ndata: " +
                     '{"choices": [{"index": 0, "delta": {"content": "after done"}}]}\n\n')
    set_field(d, "temperature", 0.5)
    set_field(d, "max-tokens", 7)
    ask(d, "Hi")
    message = wait_done(d, 1)
    assert body_text(message) == "".join(pieces)
    assert not message.find_elements(By.CSS_SELECTOR, "b, img")  # model output is text, never markup
    assert message.find_element(By.CSS_SELECTOR, ".stats").text.startswith("5 tokens")
    sent = d.execute_script("return window.__sent")
    assert sent["messages"] == [{"role": "user", "content": "Hi"}]
    assert sent["stream"] is True and sent["max_tokens"] == 7 and sent["temperature"] == 0.5


def test_error_event_mid_stream_keeps_the_text(browser, server):
    d = open_page(browser, server[0])
    d.execute_script(FAKE_STREAM, ["partial"], 'data: {"error": {"message": "tool call failed its schema", '
                     '"type": "invalid_request_error"}}\n\n')
    ask(d, "Hi")
    message = wait_done(d, 1)
    assert body_text(message) == "partial"
    error = d.find_element(By.CSS_SELECTOR, '#messages [data-role="error"]')
    assert "tool call failed its schema" in error.text
