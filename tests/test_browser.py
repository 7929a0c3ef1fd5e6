"""The status page and cross-origin streaming, in a real browser: Debian's Chromium driven by
Playwright (``playwright`` from requirements-dev.txt; the browser comes from ``apt-get
install chromium``, never from ``playwright install``)."""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from conftest import JOIN_TIMEOUT, ROOT, LiveServer, chat_body

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: apt-get install chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -r "
                               "requirements-dev.txt")
expect = sync_api.expect

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOT = ROOT / "docs" / "status-page.png"
UNLISTED_ORIGIN = "http://127.0.0.1:9"

# Runs in the page: POST a chat request with fetch() and read the body as a stream.
FETCH_STREAM = """async ([url, body]) => {
  try {
    const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify(body)});
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let raw = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return {status: response.status, raw};
      raw += decoder.decode(value, {stream: true});
    }
  } catch (error) {
    return {error: error.name};
  }
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, make_server: Callable[..., LiveServer]) -> Iterator[Any]:
    """A fresh browser tab; it closes before the servers stop (``make_server`` is set up first)."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[str]:
    """A static page served from another loopback port: a different origin from the API."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html><title>another origin</title><link rel=icon href='data:,'>")
    httpd = HTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="other-origin")
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()


def streamed_text(raw: str) -> tuple[str, bool]:
    """The concatenated ``delta.content`` of an SSE chat stream, and whether ``[DONE]`` ended it."""
    data = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(d) for d in data if d != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return text, bool(data) and data[-1] == "[DONE]"


def model_row(page: Any, model_id: str) -> Any:
    name = re.compile(f"^{re.escape(model_id)}( also .*)?$")  # the row header is the id, then any aliases
    return page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name))


def state_cell(page: Any, model_id: str) -> Any:
    return model_row(page, model_id).get_by_role("cell").first


def loaded(server: LiveServer) -> list[str]:
    return server.get("/health").json()["loaded_models"]


def test_allowed_origin_streams_a_chat_reply(make_server, page, other_origin):
    server = make_server(server={"cors_origins": [other_origin]})
    page.goto(other_origin + "/")
    result = page.evaluate(FETCH_STREAM, [server.url + "/v1/chat/completions", chat_body(max_tokens=8, stream=True)])
    assert result.get("status") == 200, result
    text, done = streamed_text(result["raw"])
    assert text and done


def test_unlisted_origin_is_blocked_by_the_browser(make_server, page, other_origin):
    server = make_server(server={"cors_origins": [UNLISTED_ORIGIN]})
    page.goto(other_origin + "/")
    result = page.evaluate(FETCH_STREAM, [server.url + "/v1/chat/completions", chat_body(max_tokens=8, stream=True)])
    assert result == {"error": "TypeError"}
    assert server.loader.loads == []  # the preflight failed, so the POST itself was never sent


def test_status_page_lists_models_and_loads_and_unloads_with_buttons(make_server, page):
    server = make_server(models={"tiny": {"aliases": ["<i>fast</i>"]}})
    page.goto(server.url + "/")
    expect(state_cell(page, "tiny-chat")).to_have_text("unloaded")
    expect(model_row(page, "tiny").locator(".aliases")).to_have_text("also <i>fast</i>")  # text, not HTML
    expect(page.locator("table i")).to_have_count(0)
    page.get_by_role("button", name="Load tiny", exact=True).click()
    expect(state_cell(page, "tiny")).to_have_text("loaded")
    assert loaded(server) == ["tiny"]
    page.get_by_role("button", name="Unload tiny", exact=True).click()
    expect(state_cell(page, "tiny")).to_have_text("unloaded")
    assert loaded(server) == []


def test_status_page_follows_the_event_stream(make_server, page):
    server = make_server()
    page.goto(server.url + "/")
    expect(page.get_by_role("status")).to_have_text("Live updates")
    server.post("/admin/load", {"model": "tiny-chat"})
    expect(state_cell(page, "tiny-chat")).to_have_text("loaded")
    expect(model_row(page, "tiny-chat").get_by_role("cell").nth(5)).to_have_text(re.compile(r"^[45]:\d\d$"))
    server.post("/admin/unload", {"model": "tiny-chat"})
    expect(state_cell(page, "tiny-chat")).to_have_text("unloaded")


def test_status_page_falls_back_to_polling_without_the_event_stream(make_server, page):
    server = make_server()
    page.route("**/admin/events*", lambda route: route.abort())
    page.goto(server.url + "/")
    expect(page.get_by_role("status")).to_have_text("Live updates unavailable: refreshing every 2 s")
    server.post("/admin/load", {"model": "tiny"})
    expect(state_cell(page, "tiny")).to_have_text("loaded", timeout=5_000)


def test_chat_box_streams_a_reply(make_server, page):
    server = make_server()
    page.goto(server.url + "/")
    page.get_by_label("Model", exact=True).select_option("tiny-chat")
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-reply")).to_have_text(re.compile(r"\S"))
    expect(page.get_by_role("button", name="Send")).to_be_enabled()  # the stream reached [DONE]
    expect(page.locator("#chat-error")).to_be_hidden()
    expect(model_row(page, "tiny-chat").get_by_role("cell").nth(3)).to_have_text("0")  # in flight, after the reply
    assert server.model_view("tiny-chat")["state"] == "loaded"


def test_chat_box_shows_an_error_event(make_server, page, models_dir):
    (models_dir / "broken.gguf").write_text("not a model")
    server = make_server()
    page.goto(server.url + "/")
    page.get_by_label("Model", exact=True).select_option("broken")
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-error")).to_contain_text("not a GGUF")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert server.model_view("broken")["state"] == "failed"


def test_page_asks_for_an_api_key_and_sends_it(make_server, page):
    server = make_server(server={"api_keys": ["sekret"]})
    if server.get("/admin/models").status_code != 401:
        pytest.skip("API keys are not enforced by create_app yet")
    page.goto(server.url + "/")
    key = page.get_by_label("API key")
    expect(key).to_be_visible()
    key.fill("wrong")
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#key-reason")).to_contain_text("Invalid API key")
    key.fill("sekret")
    page.get_by_role("button", name="Use key").click()
    expect(state_cell(page, "tiny")).to_have_text("unloaded")
    expect(page.get_by_role("status")).to_have_text("Live updates")  # the events fetch carried the key too
    expect(key).to_be_hidden()


def test_screenshot_of_the_status_page(make_server, page):
    server = make_server()
    server.post("/admin/load", {"model": "tiny-chat"})
    page.goto(server.url + "/")
    expect(state_cell(page, "tiny-chat")).to_have_text("loaded")
    expect(page.get_by_role("status")).to_have_text("Live updates")
    page.get_by_label("Model", exact=True).select_option("tiny-chat")
    image = page.screenshot(full_page=True)
    assert image.startswith(b"\x89PNG") and len(image) < 200_000
    if not SCREENSHOT.exists() or SCREENSHOT.read_bytes() != image:
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(image)


def test_status_page_counts_requests_per_api(make_server, page):
    server = make_server()
    server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    server.post("/api/generate", {"model": "tiny", "prompt": "Hello", "stream": False, "options": {"num_predict": 2}})
    page.goto(server.url + "/")
    expect(page.locator("#requests")).to_contain_text("openai 1")
    expect(page.locator("#requests")).to_contain_text("ollama 1")
