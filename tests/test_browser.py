"""The status page and cross-origin streaming, in a real browser: Debian's Chromium driven by
Playwright (``playwright`` from requirements-dev.txt; the browser comes from ``apt-get
install chromium``, never from ``playwright install``)."""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from conftest import JOIN_TIMEOUT, ROOT, LiveServer, chat_body
from gguf_factory import CHATML_TEMPLATE, build_vocab, write_llama_model, write_mlp_projector
from helpers import gbnf_literal

from chat_format import model_dialect

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: apt-get install chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -r "
                               "requirements-dev.txt")
expect = sync_api.expect

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOT = ROOT / "docs" / "status-page.png"
PHONE_SCREENSHOT = ROOT / "docs" / "status-page-phone.png"
PHONE = {"width": 390, "height": 844}
TEMPLATES = ROOT.parent / "shared" / "chat-templates"
# Model output that would run code if it were ever rendered as HTML.
HOSTILE = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
MARKDOWN_REPLY = ("Here is **bold** and `inline code`:\n\n```python\nprint('<b>hi</b>')\n```\n\n"
                  f"- first item\n- second *item*\n\n{HOSTILE}")
# Recorded in every page before its own scripts run: any Content-Security-Policy violation.
CSP_WATCH = """window.cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sample}`));"""
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
    page.add_init_script(CSP_WATCH)
    yield page
    violations = page.evaluate("window.cspViolations ?? []") if not page.is_closed() else []
    context.close()
    assert violations == [], "the page broke its own Content-Security-Policy"


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


def force_replies(page: Any, replies: list[str], extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Make the model write ``replies`` in turn, one per chat request the page sends: each
    request goes on to the real server with a grammar (and ``extra`` fields) added. Returns
    the list the page's own request bodies are appended to."""
    sent: list[dict[str, Any]] = []
    queue = list(replies)

    def handle(route: Any) -> None:
        body = json.loads(route.request.post_data)
        sent.append(json.loads(route.request.post_data))
        body.update(grammar=gbnf_literal(queue.pop(0)), temperature=0, **(extra or {}))
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", handle)
    return sent


def send_chat(page: Any, model: str, text: str) -> Any:
    """Send ``text`` from the chat box; returns the new answer once its stream has ended."""
    page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_label("Message").fill(text)
    answers = page.locator(".message.assistant")
    count = answers.count()
    page.get_by_role("button", name="Send").click()
    answer = answers.nth(count)
    expect(answer).to_have_attribute("aria-busy", "false")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    return answer


def activity_card(page: Any, model_id: str) -> Any:
    return page.locator(f'#activity .card[data-model="{model_id}"]')


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
    answer = send_chat(page, "tiny-chat", "Hello")
    expect(answer.locator(".content")).to_have_text(re.compile(r"\S"))
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
    expect(page.locator(".message.assistant.failed .content")).to_have_text("(no answer)")
    assert server.model_view("broken")["state"] == "failed"


def test_chat_with_a_model_whose_rpc_server_is_down_then_with_a_vision_model(make_server, page, models_dir):
    """An unreachable RPC server fails that model's load with the reason on the page; the page goes on
    to a text-only chat with a model that reads pictures."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    (models_dir / "split.gguf").write_bytes((models_dir / "tiny-chat.gguf").read_bytes())
    (models_dir / "vision").mkdir()
    write_llama_model(models_dir / "vision" / "seeing.gguf", seed=3, chat_template=CHATML_TEMPLATE)
    write_mlp_projector(models_dir / "vision" / "mmproj-seeing.gguf")
    server = make_server(models={"split": {"rpc_servers": [dead]}})
    page.goto(server.url + "/")
    page.get_by_label("Model", exact=True).select_option("split")
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-error")).to_contain_text("unreachable")
    expect(page.locator(".message.assistant.failed .content")).to_have_text("(no answer)")
    answer = send_chat(page, "seeing", "Hello")
    expect(answer.locator(".content")).to_have_text(re.compile(r"\S"))
    expect(page.locator("#chat-error")).to_be_hidden()
    assert server.model_view("split")["state"] == "failed" and server.model_view("seeing")["state"] == "loaded"


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


def test_status_page_counts_requests_per_api(make_server, page):
    server = make_server()
    server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    server.post("/api/generate", {"model": "tiny", "prompt": "Hello", "stream": False, "options": {"num_predict": 2}})
    page.goto(server.url + "/")
    expect(page.locator("#requests")).to_contain_text("openai 1")
    expect(page.locator("#requests")).to_contain_text("ollama 1")


def test_memory_bar_and_activity_chart_follow_a_load_and_a_stream(make_server, page):
    server = make_server()
    page.goto(server.url + "/")
    expect(page.locator("#memory-summary")).to_contain_text(re.compile(r"RAM .* of .* used"))
    expect(page.locator("#memory-summary")).to_contain_text("no memory_budget set")
    segment = page.locator('#memory-bar .segment[data-model="tiny-chat"]')
    expect(segment).to_have_count(0)
    expect(page.locator("#no-activity")).to_be_visible()

    page.get_by_role("button", name="Load tiny-chat", exact=True).click()
    expect(segment).to_have_count(1)  # the worker's resident memory, as a share of the machine's
    assert float(segment.evaluate("s => parseFloat(s.style.width)")) > 0
    pid = server.model_view("tiny-chat")["pid"]
    expect(page.locator("#memory-legend")).to_contain_text(f"tiny-chat · pid {pid}")
    card = activity_card(page, "tiny-chat")
    expect(card.locator(".counts")).to_have_text("loaded · 0 in flight · 0 of 4 slots generating · 0 queued")
    expect(card.locator(".chart")).to_have_attribute("data-tokens", "0")
    flat = card.locator("polyline").get_attribute("points")

    server.loader.token_delay = 0.05  # slow enough to watch the request take a slot
    page.get_by_label("Model", exact=True).select_option("tiny-chat")
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    expect(card.locator(".counts")).to_contain_text("1 in flight · 1 of 4 slots generating")
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    server.loader.token_delay = 0
    send_chat(page, "tiny-chat", "Hello again")

    expect(card.locator(".chart")).not_to_have_attribute("data-tokens", "0")
    expect(card.locator(".speed")).to_contain_text(re.compile(r"now \d+\.\d tok/s · \d+ tokens in 2 completions"))
    expect(card.locator(".speed")).to_contain_text(re.compile(r"first token \d+ ms \(median \d+ ms\)"))
    assert card.locator("polyline").get_attribute("points") != flat
    expect(card.locator(".counts")).to_contain_text("0 in flight · 0 of 4 slots generating")


def test_stop_ends_the_generation_on_the_server(make_server, page):
    server = make_server()
    server.post("/admin/load", {"model": "tiny-chat"})
    server.loader.token_delay = 0.05
    page.goto(server.url + "/")
    page.get_by_label("Model", exact=True).select_option("tiny-chat")
    page.get_by_label("Message").fill("Tell me a long story")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".message.assistant .content")
    expect(answer).to_have_text(re.compile(r"\S{3}"))  # streaming
    assert server.model_view("tiny-chat")["in_flight"] == 1
    page.get_by_role("button", name="Stop").click()
    server.wait_for(lambda: server.model_view("tiny-chat")["in_flight"] == 0)  # the hang-up cancelled it
    partial = answer.text_content()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.locator("#chat-error")).to_be_hidden()
    page.wait_for_timeout(300)
    assert answer.text_content() == partial  # nothing more arrives


def test_events_are_listed_with_their_details_and_filtered(make_server, page, models_dir):
    (models_dir / "broken.gguf").write_text("not a model")
    server = make_server()
    page.goto(server.url + "/")
    expect(page.locator("#no-events")).to_have_text("No events yet.")
    server.post("/admin/load", {"model": "tiny"})
    server.post("/admin/unload", {"model": "tiny"})
    assert server.post("/admin/load", {"model": "broken"}).status_code >= 400
    events = page.locator("#events li")
    kind = lambda name: page.locator(f'#events li[data-kind="{name}"]')  # noqa: E731
    expect(kind("loaded")).to_contain_text(re.compile(r"loaded tiny: in \d+\.?\d* s, [\d.]+ MiB resident"))
    expect(kind("unloaded")).to_contain_text(re.compile(r"unloaded tiny: reason: admin, in [\d.]+ s, freed"))
    expect(kind("failed")).to_contain_text("failed broken: ")
    expect(kind("failed")).to_contain_text("not a GGUF")
    expect(events.first).to_contain_text("broken")  # newest first

    page.get_by_label("Show").select_option("problem")
    expect(events.filter(visible=True)).to_have_count(1)
    expect(events.filter(visible=True)).to_contain_text("failed broken")
    page.get_by_label("Show").select_option("all")
    page.get_by_label("Filter by model").fill("tin")
    expect(events.filter(visible=True).filter(has_text="broken")).to_have_count(0)
    expect(events.filter(visible=True).filter(has_text="unloaded tiny")).to_have_count(1)
    page.get_by_label("Filter by model").fill("nothing like it")
    expect(page.locator("#no-events")).to_have_text("No events match the filter.")

    page.reload()  # a new page gets the recent history from the stream
    expect(page.locator("#events li", has_text="unloaded tiny")).to_have_count(1)


def test_two_turn_chat_renders_markdown_and_shows_html_as_text(make_server, page):
    server = make_server()
    page.goto(server.url + "/")
    sent = force_replies(page, [MARKDOWN_REPLY, "Sure:\n\n1. one\n2. two"])
    first = send_chat(page, "tiny-chat", "Show me some <b>markdown</b>")
    content = first.locator(".content")
    expect(content.locator("strong")).to_have_text("bold")
    expect(content.locator("p code")).to_have_text("inline code")
    expect(content.locator("pre code")).to_have_text("print('<b>hi</b>')")
    expect(content.locator("pre code")).to_have_attribute("data-language", "python")
    expect(content.locator("ul li")).to_have_text(["first item", "second item"])
    expect(content.locator("ul li em")).to_have_text("item")
    expect(content).to_contain_text(HOSTILE)  # shown as text...
    expect(page.locator("#chat-log script, #chat-log img, #chat-log b")).to_have_count(0)  # ...never as HTML
    expect(page.locator(".message.user").first).to_have_text("You" + "Show me some <b>markdown</b>")
    assert page.evaluate("window.pwned") is None

    second = send_chat(page, "tiny-chat", "And a numbered list?")
    expect(second.locator(".content ol li")).to_have_text(["one", "two"])
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == MARKDOWN_REPLY  # the first answer, as the model wrote it
    assert sent[1]["stream"] is True
    expect(page.locator(".message")).to_have_count(4)

    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".message")).to_have_count(0)


def test_markdown_renderer_builds_nodes_and_never_html(make_server, page):
    """The renderer on its own, on input no model here writes: links, quotes, odd nesting."""
    server = make_server()
    page.goto(server.url + "/")
    rendered = page.evaluate("""() => {
      const box = document.createElement("div");
      box.append(renderMarkdown([
        "# Title", "> quoted *text*", "", "[ok](https://example.com/a) [bad](javascript:alert(1))",
        "***", "```", "unclosed <script>alert(1)</script>",
      ].join("\\n")));
      return {html: box.innerHTML, links: [...box.querySelectorAll("a")].map((a) => [a.href, a.rel, a.textContent]),
              scripts: box.querySelectorAll("script").length};
    }""")
    assert rendered["scripts"] == 0
    assert rendered["links"] == [["https://example.com/a", "noopener noreferrer nofollow", "ok"]]
    assert "<h3>Title</h3>" in rendered["html"]
    assert "<blockquote><p>quoted <em>text</em></p></blockquote>" in rendered["html"]
    assert "[bad](javascript:alert(1))" in rendered["html"]
    assert "<hr>" in rendered["html"]
    assert "<pre><code>unclosed &lt;script&gt;alert(1)&lt;/script&gt;</code></pre>" in rendered["html"]


def test_reasoning_is_shown_folded(make_server, page, models_dir):
    template = (TEMPLATES / "HuggingFaceTB-SmolLM3-3B.jinja").read_text(encoding="utf-8")
    markers = model_dialect(template, None).special_markers
    write_llama_model(models_dir / "thinker.gguf", chat_template=template, control_tokens=markers, seed=4)
    tokens, _, _ = build_vocab(control_tokens=markers)
    bias = {str(tokens.index(m)): 100.0 for m in markers}  # markers as their control tokens
    server = make_server({"n_ctx": 4096})
    page.goto(server.url + "/")
    force_replies(page, ["<think>\nThe user greets me.\n</think>\nHello **there**!"], {"logit_bias": bias})
    answer = send_chat(page, "thinker", "Hi")
    reasoning = answer.locator("details.reasoning")
    expect(reasoning).to_be_visible()
    expect(reasoning).not_to_have_attribute("open", "")
    expect(reasoning.locator("summary")).to_have_text("Reasoning")
    expect(reasoning.locator("div")).to_be_hidden()  # folded
    reasoning.locator("summary").click()
    expect(reasoning.locator("div")).to_have_text("The user greets me.")
    expect(answer.locator(".content")).to_have_text("Hello there!")
    expect(answer.locator(".content strong")).to_have_text("there")


def test_the_whole_page_works_with_api_keys(make_server, page):
    server = make_server(server={"api_keys": ["sekret"]})
    page.goto(server.url + "/")
    page.get_by_label("API key").fill("sekret")
    page.get_by_role("button", name="Use key").click()
    expect(page.get_by_role("status")).to_have_text("Live updates")
    expect(page.locator("#memory-summary")).to_contain_text("RAM")  # /admin/stats carried the key
    force_replies(page, ["A **keyed** answer"])
    answer = send_chat(page, "tiny-chat", "Hello")
    expect(answer.locator(".content strong")).to_have_text("keyed")
    expect(page.locator("#events li", has_text="loaded tiny-chat")).to_have_count(1)
    expect(activity_card(page, "tiny-chat").locator(".chart")).not_to_have_attribute("data-tokens", "0")


def test_csp_blocks_inline_code_and_the_page_reports_it(make_server, page):
    """The violation check the page fixture runs after every test can see a violation."""
    server = make_server()
    response = page.goto(server.url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.evaluate("""() => {
      const script = document.createElement("script");
      script.textContent = "window.inlineRan = true";
      document.body.append(script);
    }""")
    page.wait_for_function("window.cspViolations.length > 0")
    assert page.evaluate("window.inlineRan") is None
    page.evaluate("window.cspViolations.length = 0")


def _screenshot(page: Any, path: Path) -> None:
    """Take it always; write it over the README's copy only when asked (UPDATE_SCREENSHOTS=1),
    since pids and times make every run's picture differ and a test run must not dirty the tree."""
    image = page.screenshot(full_page=True)
    assert image.startswith(b"\x89PNG") and len(image) < 600_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1" and (not path.exists() or path.read_bytes() != image):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image)


def _show_a_busy_server(server: LiveServer, page: Any) -> None:
    server.post("/admin/load", {"model": "tiny"})
    server.post("/admin/unload", {"model": "tiny"})
    server.post("/admin/load", {"model": "tiny-chat"})
    page.goto(server.url + "/")
    expect(state_cell(page, "tiny-chat")).to_have_text("loaded")
    expect(page.get_by_role("status")).to_have_text("Live updates")
    force_replies(page, [MARKDOWN_REPLY.replace(HOSTILE, "Shown as text: <script>alert(1)</script>")])
    send_chat(page, "tiny-chat", "Show me some markdown")
    expect(activity_card(page, "tiny-chat").locator(".chart")).not_to_have_attribute("data-tokens", "0")
    page.locator("#chat-message").blur()


def test_screenshot_of_the_status_page(make_server, page):
    server = make_server(manager={"memory_budget": "2GiB"})
    _show_a_busy_server(server, page)
    expect(page.locator("#memory-bar .budget")).to_be_visible()
    _screenshot(page, SCREENSHOT)


def test_phone_sized_screen(make_server, page):
    server = make_server()
    page.set_viewport_size(PHONE)
    _show_a_busy_server(server, page)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing runs off the side
    header = page.locator("#models thead")
    expect(header).to_be_hidden()  # each model is a card, each value labelled
    cell = model_row(page, "tiny-chat").get_by_role("cell").nth(1)
    assert cell.evaluate("c => getComputedStyle(c, '::before').content") == '"Size"'
    button = page.get_by_role("button", name="Unload tiny-chat", exact=True)
    box = button.bounding_box()
    assert box is not None and box["x"] + box["width"] <= PHONE["width"]
    _screenshot(page, PHONE_SCREENSHOT)
