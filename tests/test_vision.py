"""Pictures in chat, through the real server and llama.cpp's mtmd on a tiny vision model.

The model is a tiny llama text model paired (by the folder rule) with a tiny LLaVA-style
``mlp`` projector written by ``gguf_factory.write_mlp_projector``: every picture goes through
the real CLIP encoder and projector into 16 embeddings, in about a millisecond.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import wave
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import numpy as np
import ollama
import openai
import pytest
import requests
from conftest import JOIN_TIMEOUT, LiveServer, check_response, sse_events
from gguf_factory import CHATML_TEMPLATE, write_audio_projector, write_llama_model, write_mlp_projector
from PIL import Image

from config import load_settings
from discovery import discover, pair_projector
from errors import InvalidRequest
from media import SENT_PIXELS, MediaLimits, decode_audio, decode_image

IMAGE_TOKENS = 16  # (image_size / patch_size) ** 2 of the tiny projector
MODEL = "tiny-vision"


def picture(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    """A small picture of coloured stripes (its colours depend on ``seed``)."""
    image = Image.new("RGB", size)
    image.putdata([((x * 7 + seed * 50) % 256, (y * 11 + seed * 30) % 256, (seed * 90) % 256)
                   for y in range(size[1]) for x in range(size[0])])
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(raw: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(raw)}}


def ask(*parts: Any, text: str = "What is in the picture?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def chat(server: LiveServer, messages: list[dict[str, Any]], model: str = MODEL, **extra: Any) -> requests.Response:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 8, **extra}
    return check_response(requests.post(server.url + "/v1/chat/completions", json=body, timeout=JOIN_TIMEOUT))


def media_chunks(server: LiveServer) -> int:
    return sum(w.stats().get("media_chunks", 0) for w in server.loader.live())


@pytest.fixture
def vision_dir(models_dir: Path) -> Path:
    """``tiny-vision`` with its projector in a folder of its own (``tiny-chat`` has none)."""
    folder = models_dir / "vision"
    folder.mkdir()
    write_llama_model(folder / f"{MODEL}.gguf", seed=3, chat_template=CHATML_TEMPLATE)
    write_mlp_projector(folder / f"mmproj-{MODEL}.gguf")
    return models_dir


@pytest.fixture
def server(make_server, vision_dir: Path) -> LiveServer:
    return make_server()


def test_listing_shows_capabilities_and_the_estimate_counts_the_projector(server: LiveServer,
                                                                           vision_dir: Path) -> None:
    models = {m["id"]: m for m in requests.get(server.url + "/v1/models", timeout=10).json()["data"]}
    assert models[MODEL]["capabilities"] == ["completion", "vision"]
    assert models["tiny-chat"]["capabilities"] == ["completion"]
    projector = (vision_dir / "vision" / f"mmproj-{MODEL}.gguf").stat().st_size
    # The two text models have the same shape and size; only one has a projector.
    assert models[MODEL]["estimated_memory_bytes"] - models["tiny-chat"]["estimated_memory_bytes"] >= projector


def test_a_picture_goes_through_the_encoder(server: LiveServer) -> None:
    text_only = chat(server, ask(text="What is in the picture?\n")).json()
    answer = chat(server, ask(image_part(picture(1)))).json()
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + IMAGE_TOKENS
    assert media_chunks(server) == 1


def test_two_pictures_streamed(server: LiveServer) -> None:
    response = chat(server, ask(image_part(picture(1)), image_part(picture(2))), stream=True,
                    stream_options={"include_usage": True})
    assert response.status_code == 200
    events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text
    assert events[-2]["usage"]["prompt_tokens"] > 2 * IMAGE_TOKENS
    assert media_chunks(server) == 2


def test_pictures_in_several_messages_and_a_picture_alone(server: LiveServer) -> None:
    messages = [{"role": "user", "content": [image_part(picture(1))]},
                {"role": "assistant", "content": "A picture."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"}, image_part(picture(2)),
                                             image_part(picture(3, fmt="JPEG"))]}]
    answer = chat(server, messages)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 3 * IMAGE_TOKENS
    assert media_chunks(server) == 3


def test_the_pictures_change_the_answer(server: LiveServer) -> None:
    def top(raw: bytes) -> list[tuple[str, float]]:
        body = chat(server, ask(image_part(raw)), max_tokens=1, logprobs=True, top_logprobs=5).json()
        entries = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return [(e["token"], round(e["logprob"], 4)) for e in entries]

    assert top(picture(1)) == top(picture(1))
    assert top(picture(1)) != top(picture(2))


def test_a_second_turn_reuses_the_encoded_picture(server: LiveServer) -> None:
    first = ask(image_part(picture(1)))
    answer = chat(server, first).json()
    assert media_chunks(server) == 1
    second = [*first, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
              {"role": "user", "content": "Tell me more."}]
    again = chat(server, second).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= answer["usage"]["prompt_tokens"] - 1
    assert media_chunks(server) == 1  # not encoded again

    other = [{**second[0], "content": [second[0]["content"][0], image_part(picture(2))]}, *second[1:]]
    changed = chat(server, other).json()
    # The text before the picture may be reused; the picture and all after it may not.
    assert changed["usage"]["prompt_tokens_details"]["cached_tokens"] < changed["usage"]["prompt_tokens"] - 20
    assert media_chunks(server) == 2


@pytest.mark.parametrize(("url", "code"), [
    (data_url(b"this is not a picture at all"), "invalid_image"),
    (data_url(picture(1, size=(200, 200))[:400]), "invalid_image"),  # truncated in its pixel data
    (data_url(picture(1, size=(200, 200), fmt="JPEG")[:700], "image/jpeg"), "invalid_image"),
    ("data:image/png;base64,!!!not base64!!!", "invalid_image_url"),
    ("data:image/png;base64", "invalid_image_url"),
    ("file:///etc/passwd", "invalid_image_url"),
    ("https://example.com/cat.png", "image_url_not_allowed"),
    ("http://[::1/cat.png", "invalid_image_url"),  # an unclosed IPv6 literal was a 500
])
def test_bad_pictures_are_refused_naming_the_part(server: LiveServer, url: str, code: str) -> None:
    response = chat(server, ask({"type": "image_url", "image_url": {"url": url}}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("messages[0].content[1]", code)
    assert chat(server, ask(image_part(picture(1)))).status_code == 200  # nothing broke


def test_too_large_pictures_are_refused(make_server, vision_dir: Path) -> None:
    server = make_server({"max_image_bytes": 2000, "max_image_pixels": 50 * 50})
    big_file = chat(server, ask(image_part(picture(1, size=(200, 200)))))
    assert big_file.status_code == 400
    assert big_file.json()["error"]["code"] == "image_too_large"
    small_file_many_pixels = Image.new("RGB", (400, 400))
    out = io.BytesIO()
    small_file_many_pixels.save(out, format="PNG")
    assert len(out.getvalue()) < 2000
    many = chat(server, [{"role": "user", "content": [image_part(out.getvalue())]}])
    assert many.status_code == 400
    error = many.json()["error"]
    assert (error["code"], error["param"]) == ("image_too_large", "messages[0].content[0]")


def test_a_model_without_projector_refuses_pictures_before_loading(server: LiveServer) -> None:
    response = chat(server, ask(image_part(picture(1))), model="tiny-chat")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("messages[0].content[1]", "model_not_multimodal")
    assert "projector" in error["message"]
    assert not server.loader.loads


def test_pictures_are_turned_upright_laid_on_white_and_scaled_down() -> None:
    def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
        out = io.BytesIO()
        image.save(out, format=fmt, **options)
        return out.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    upright = decode_image(encoded(Image.new("RGB", (40, 20), "red"), "JPEG", exif=exif), MediaLimits(), "p")
    assert (upright.width, upright.height) == (20, 40)
    clear = decode_image(encoded(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"), MediaLimits(), "p")
    assert clear.data[:3] == b"\xff\xff\xff"
    huge = decode_image(encoded(Image.new("RGB", (4200, 4200), "blue"), "PNG"), MediaLimits(), "p")
    assert huge.width == huge.height and huge.width * huge.height <= SENT_PIXELS
    assert len(huge.data) == huge.width * huge.height * 3


def test_media_marker_in_text_is_refused(server: LiveServer) -> None:
    response = chat(server, ask(image_part(picture(1)), text="look: <__media__>"))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


def test_the_mmproj_setting_overrides_the_folder_rule(make_server, vision_dir: Path) -> None:
    server = make_server(models={MODEL: {"mmproj": ""}, "tiny-chat": {"mmproj": f"vision/mmproj-{MODEL}.gguf"}})
    models = {m["id"]: m for m in requests.get(server.url + "/v1/models", timeout=10).json()["data"]}
    assert models[MODEL]["capabilities"] == ["completion"]
    assert models["tiny-chat"]["capabilities"] == ["completion", "vision"]
    assert chat(server, ask(image_part(picture(1))), model="tiny-chat").status_code == 200
    assert chat(server, ask(image_part(picture(1)))).status_code == 400


def test_a_loaded_model_lists_what_it_loaded_until_a_changed_mmproj_takes_effect(
        make_server, vision_dir: Path, tmp_path: Path) -> None:
    """Settings change at a model's next load; until then its listing and the pictures it
    takes describe the instance that is loaded, not the config."""
    config = tmp_path / "config.json"
    manager = {"models_directory": str(vision_dir), "n_ctx": 512, "n_gpu_layers": 0, "n_threads": 1}

    def configure(model: dict[str, Any]) -> None:
        config.write_text(json.dumps({"model_manager": manager, "models": {MODEL: model}}))

    configure({"mmproj": ""})
    server = make_server(models={MODEL: {"mmproj": ""}}, config_path=config)

    def capabilities() -> list[str]:
        return server.model_view(MODEL)["capabilities"]

    assert chat(server, ask(text="Hi")).status_code == 200  # loaded without a projector
    configure({})  # the folder rule pairs its mmproj again
    assert server.post("/admin/reload").status_code == 200
    assert capabilities() == ["completion"]
    refused = chat(server, ask(image_part(picture(1))))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content[1]"
    server.post("/admin/unload", {"model": MODEL})
    assert capabilities() == ["completion", "vision"]
    assert chat(server, ask(image_part(picture(1)))).status_code == 200  # loaded with it now

    configure({"mmproj": ""})
    assert server.post("/admin/reload").status_code == 200
    assert capabilities() == ["completion", "vision"]
    assert chat(server, ask(image_part(picture(2)))).status_code == 200  # its worker still has the projector
    server.post("/admin/unload", {"model": MODEL})
    assert capabilities() == ["completion"]


def test_a_broken_projector_fails_the_load_without_telling_where_it_lives(make_server, vision_dir: Path) -> None:
    (vision_dir / "vision" / f"mmproj-{MODEL}.gguf").write_bytes(b"GGUF" + bytes(100))
    server = make_server(server={"api_keys": ["secret"]})
    body = {"model": MODEL, "messages": ask(text="Hi"), "max_tokens": 2}
    failed = requests.post(server.url + "/v1/chat/completions", json=body, timeout=JOIN_TIMEOUT,
                           headers={"Authorization": "Bearer secret"})
    assert failed.json()["error"]["code"] == "model_load_failed"
    health = requests.get(server.url + "/health", timeout=10).json()  # public: no key
    error = next(m for m in health["models"] if m["id"] == MODEL)["error"]
    assert f"mmproj-{MODEL}.gguf" in error and f"mmproj-{MODEL}.gguf" in failed.text
    assert str(vision_dir) not in error and str(vision_dir) not in failed.text


def test_pairing_rule_with_several_projectors(tmp_path: Path) -> None:
    gemma, qwen = tmp_path / "mmproj-gemma-3-4b-it-f16.gguf", tmp_path / "mmproj-Qwen2.5-VL-7B-f16.gguf"
    assert pair_projector(tmp_path / "gemma-3-4b-it-Q4_K_M.gguf", [gemma, qwen]) == gemma
    assert pair_projector(tmp_path / "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf", [gemma, qwen]) == qwen
    assert pair_projector(tmp_path / "llama-3.gguf", [gemma, qwen]) is None  # nothing in common
    f16, f32 = tmp_path / "mmproj-model-f16.gguf", tmp_path / "mmproj-model-f32.gguf"
    assert pair_projector(tmp_path / "model-Q8_0.gguf", [f16, f32]) is None  # a tie
    assert pair_projector(tmp_path / "anything.gguf", [f16]) == f16  # the only one


def test_a_picture_is_encoded_beside_another_generation(server: LiveServer) -> None:
    assert chat(server, ask(text="warm up")).status_code == 200
    server.loader.token_delay = 0.02  # the long answer below keeps generating meanwhile
    body = {"model": MODEL, "messages": ask(text="Tell a long story."), "max_tokens": 60, "stream": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=JOIN_TIMEOUT) as long:
        lines = long.iter_lines()
        while b"content" not in next(lines):
            pass  # it is generating
        assert chat(server, ask(image_part(picture(1)))).status_code == 200
        for _ in lines:
            pass
    stats = server.loader.live()[0].stats()
    assert stats["media_chunks"] == 1 and stats["media_beside_generation"] == 1


def test_n_choices_send_their_picture_once_and_match_one_choice(server: LiveServer, monkeypatch) -> None:
    """A request's choices share its prompt: the picture's pixels cross the pipe once, and
    each greedy choice says what a single one does."""
    one = chat(server, ask(image_part(picture(1))))
    assert one.status_code == 200
    worker = server.loader.live()[0]
    sent: list[Any] = []
    send = worker._send
    monkeypatch.setattr(worker, "_send", lambda message, *ids: (sent.append(message), send(message, *ids)))
    three = chat(server, ask(image_part(picture(1))), n=3)
    assert three.status_code == 200, three.text
    texts = [c["message"]["content"] for c in three.json()["choices"]]
    assert texts == [one.json()["choices"][0]["message"]["content"]] * 3
    with_media = [m for m in sent if getattr(m, "media", ())]
    assert len(with_media) == 1 and len(with_media[0].ids) == 3, sent


def test_the_worker_refuses_media_it_cannot_use(server: LiveServer) -> None:
    """The server never sends such input; the worker still answers it with an error, not a crash."""
    from engine.client import RequestFailed
    from engine.protocol import MediaInput, SamplingParams

    assert chat(server, ask(text="load")).status_code == 200
    worker = server.loader.live()[0]
    prompt = worker.tokenize("Hello there", add_special=True)
    bad = [MediaInput(1, "image", 40, 30, b"short", b"d" * 32, "messages[0].content[0]"),
           MediaInput(1, "image", 0, 0, b"", b"d" * 32, "messages[0].content[0]"),
           MediaInput(1, "audio", 10, 1, b"\0" * 40, b"d" * 32, "messages[0].content[0]"),
           MediaInput(len(prompt), "image", 1, 1, b"\0\0\0", b"d" * 32, "messages[0].content[0]")]  # ends the prompt
    for media in bad:
        with pytest.raises(RequestFailed) as refused:
            "".join(worker.generate(prompt, SamplingParams(max_tokens=2), (media,)))
        assert refused.value.kind == "invalid_request"
    with pytest.raises(RequestFailed):
        worker.media_cells((bad[0],))
    assert worker.media_cells((MediaInput(0, "image", 3, 2, b"\1" * 18, b"e" * 32),)) == [IMAGE_TOKENS]
    assert chat(server, ask(image_part(picture(1)))).status_code == 200


# ------------------------------------------------------------------ the other APIs


def test_the_openai_client_sends_pictures(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=ask(image_part(picture(1))),  # type: ignore[arg-type]
                                            max_tokens=5, temperature=0)
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > IMAGE_TOKENS
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, max_tokens=5, messages=ask(  # type: ignore[arg-type]
            {"type": "image_url", "image_url": {"url": data_url(b"GIF89a...")}}))
    assert refused.value.body["param"] == "messages[0].content[1]"  # type: ignore[index]


def test_anthropic_count_tokens_counts_the_pictures(server: LiveServer) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(picture(1)).decode()}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, block, block]}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages)  # type: ignore[arg-type]
    answer = client.messages.create(model=MODEL, max_tokens=3, messages=messages)  # type: ignore[arg-type]
    assert counted.input_tokens == answer.usage.input_tokens > 2 * IMAGE_TOKENS


def test_anthropic_image_blocks(server: LiveServer) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(picture(1)).decode()}}
    messages = [{"role": "user", "content": [block, {"type": "text", "text": "What is this?"}]}]
    answer = client.messages.create(model=MODEL, max_tokens=5, messages=messages)  # type: ignore[arg-type]
    assert answer.content[0].text  # type: ignore[union-attr]
    assert answer.usage.input_tokens > IMAGE_TOKENS
    with client.messages.stream(model=MODEL, max_tokens=5, messages=messages) as stream:  # type: ignore[arg-type]
        usage = stream.get_final_message().usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == answer.usage.input_tokens
    assert usage.cache_read_input_tokens
    assert media_chunks(server) == 1  # the stream's prompt came from the cache

    broken = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=MODEL, max_tokens=5, messages=[  # type: ignore[arg-type]
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, broken]}])
    assert "messages[0].content[1]" in refused.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as misplaced:
        client.messages.create(model=MODEL, max_tokens=5, messages=[  # type: ignore[arg-type]
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [block]}])
    assert misplaced.value.body["error"]["message"] == (  # type: ignore[index]
        "Invalid 'messages[1].content[0]': image blocks cannot be sent in assistant messages")


def test_ollama_images(server: LiveServer) -> None:
    client = ollama.Client(host=server.url)
    assert "vision" in (client.show(MODEL).capabilities or [])
    assert "vision" not in (client.show("tiny-chat").capabilities or [])
    answer = client.chat(model=MODEL, messages=[{"role": "user", "content": "What is this?", "images": [picture(1)]}],
                         options={"num_predict": 5, "temperature": 0})
    assert answer.message.content
    assert (answer.prompt_eval_count or 0) > IMAGE_TOKENS
    generated = client.generate(model=MODEL, prompt="Describe it.", images=[picture(2)],
                                options={"num_predict": 5, "temperature": 0})
    assert generated.response
    assert media_chunks(server) == 2
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "?", "images": [picture(1), b"junk"]}])
    assert refused.value.status_code == 400 and "messages[0].images[1]" in refused.value.error


def test_media_settings_from_the_environment() -> None:
    settings = load_settings(None, environ={"LLAMA_SERVER_MAX_IMAGE_BYTES": "5MiB",
                                            "LLAMA_SERVER_IMAGE_URL_HOSTS": "a.example.com, b.example.com",
                                            "LLAMA_SERVER_MAX_AUDIO_BYTES": "1MB"}).model_manager
    assert (settings.max_image_bytes, settings.max_audio_bytes) == (5 * 2**20, 10**6)
    assert settings.image_url_hosts == ["a.example.com", "b.example.com"]


def test_discovery_pairs_projectors_by_folder(tmp_path: Path) -> None:
    for name in ("a/model.gguf", "a/mmproj-model.gguf", "b/one.gguf", "b/two.gguf", "b/mmproj-x-f16.gguf",
                 "b/mmproj-y-f16.gguf", "c/plain.gguf"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"GGUF")
    found = discover(tmp_path)
    assert sorted(found) == ["model", "one", "plain", "two"]  # projectors are not models
    assert found["model"].mmproj == tmp_path / "a" / "mmproj-model.gguf"
    assert found["one"].mmproj is None and found["one"].unpaired == ("mmproj-x-f16.gguf", "mmproj-y-f16.gguf")
    assert found["plain"].mmproj is None and not found["plain"].unpaired


# ------------------------------------------------------------------ http(s) image URLs


class _Pictures(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def picture_host() -> Iterator[str]:
    _Pictures.body = picture(4)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Pictures)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    httpd.shutdown()
    thread.join(JOIN_TIMEOUT)
    httpd.server_close()


def test_image_urls_from_allowed_hosts(make_server, vision_dir: Path, picture_host: str) -> None:
    part = {"type": "image_url", "image_url": {"url": picture_host}}
    allowed = make_server({"image_url_hosts": ["127.0.0.1"], "image_url_private": True})
    assert chat(allowed, ask(part)).status_code == 200
    # http.client sends only ASCII: a path with other characters (or a space) was a 500.
    unusual = {"type": "image_url", "image_url": {"url": picture_host.replace("cat.png", "chat noir café.png")}}
    assert chat(allowed, ask(unusual)).status_code == 200
    assert chat(allowed, ask(image_part(picture(4)))).json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 20

    loopback = make_server({"image_url_hosts": ["127.0.0.1"]})
    refused = chat(loopback, ask(part))
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "image_url_not_allowed"
    assert "private" in refused.json()["error"]["message"]


class _Dripping(BaseHTTPRequestHandler):
    """Sends its answer a byte every 50 ms, in its headers or in its body, for a minute."""

    in_headers = False

    def do_GET(self) -> None:
        if self.in_headers:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
        for _ in range(1200):
            try:
                self.wfile.write(b"X" if not self.in_headers else b"X-Slow: 1\r\n"[:1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.mark.parametrize("in_headers", [False, True])
def test_image_url_timeout_bounds_a_dripping_server(make_server, vision_dir: Path, in_headers: bool) -> None:
    """Each read's socket timeout was the only limit: a byte every 50 ms held the request for ever."""
    handler = type("Dripping", (_Dripping,), {"in_headers": in_headers})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        server = make_server({"image_url_hosts": ["127.0.0.1"], "image_url_private": True, "image_url_timeout": 1})
        part = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"}}
        response = chat(server, ask(part))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("messages[0].content[1]", "image_url_failed")
        assert "image_url_timeout" in error["message"]
    finally:
        httpd.shutdown()
        thread.join(JOIN_TIMEOUT)
        httpd.server_close()


# ------------------------------------------------------------------ sounds

AUDIO_MODEL = "tiny-audio"
AUDIO_WINDOW_TOKENS = 750  # a 30-second window: 3000 mel frames, halved by the convolution and the pool


def wav(seconds: float = 2.0, rate: int = 44100, channels: int = 2, width: int = 2, pitch: float = 440.0) -> bytes:
    """A sine tone as a PCM WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * pitch * t) * 0.5
    scale = 2 ** (8 * width - 1) - 1
    ints = np.round(tone * scale).astype(np.int64)
    if width == 1:
        frames = (ints + 128).astype(np.uint8).tobytes()
    else:
        frames = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints) if width == 3 \
            else ints.astype(np.int16 if width == 2 else np.int32).tobytes()
    frame_size = width
    interleaved = b"".join(frames[i:i + frame_size] * channels for i in range(0, len(frames), frame_size)) \
        if channels > 1 else frames
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(interleaved)
    return out.getvalue()


def audio_part(raw: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


@pytest.fixture
def hearing(make_server, vision_dir: Path) -> LiveServer:
    """``tiny-audio`` with a tiny Whisper-style (qwen2a) projector, beside ``tiny-vision``."""
    folder = vision_dir / "audio"
    folder.mkdir()
    write_llama_model(folder / f"{AUDIO_MODEL}.gguf", seed=5, chat_template=CHATML_TEMPLATE)
    write_audio_projector(folder / f"mmproj-{AUDIO_MODEL}.gguf")
    return make_server(models={AUDIO_MODEL: {"n_ctx": 2048}})


def test_sounds_go_through_the_audio_encoder(hearing: LiveServer) -> None:
    models = {m["id"]: m for m in requests.get(hearing.url + "/v1/models", timeout=10).json()["data"]}
    assert models[AUDIO_MODEL]["capabilities"] == ["completion", "audio"]
    first = ask(audio_part(wav()), text="What do you hear?")
    answer = chat(hearing, first, model=AUDIO_MODEL)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["prompt_tokens"] > AUDIO_WINDOW_TOKENS
    assert media_chunks(hearing) == 1
    second = [*first, {"role": "assistant", "content": answer.json()["choices"][0]["message"]["content"]},
              {"role": "user", "content": "And then?"}]
    again = chat(hearing, second, model=AUDIO_MODEL).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 1
    assert media_chunks(hearing) == 1


def test_bad_sounds_are_refused_naming_the_part(hearing: LiveServer) -> None:
    cases = [(audio_part(b"ID3 not really an mp3", fmt="mp3"), "unsupported_media"),
             (audio_part(b"RIFF....WAVEjunk"), "invalid_audio"),
             (audio_part(wav()[:-1000]), "invalid_audio"),  # truncated
             ({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, "invalid_audio"),
             # One sample made mtmd abort the worker; a few samples a second, resampled to 16 kHz,
             # made a 20 kB file hours of sound the worker hung on.
             (audio_part(wav(seconds=1 / 16000, rate=16000, channels=1)), "invalid_audio"),
             (audio_part(wav(seconds=0.05, rate=16000, channels=1)), "invalid_audio"),
             (audio_part(wav(seconds=2000, rate=10, channels=1, width=1)), "invalid_audio")]
    for part, code in cases:
        response = chat(hearing, ask(part), model=AUDIO_MODEL)
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("messages[0].content[1]", code)
    picture_to_ears = chat(hearing, ask(image_part(picture(1))), model=AUDIO_MODEL)
    assert picture_to_ears.json()["error"]["code"] == "model_not_multimodal"
    assert "reads only audio" in picture_to_ears.json()["error"]["message"]
    sound_to_eyes = chat(hearing, ask(audio_part(wav())), model=MODEL)
    assert sound_to_eyes.json()["error"]["code"] == "model_not_multimodal"
    assert chat(hearing, ask(audio_part(wav(seconds=0.5))), model=AUDIO_MODEL).status_code == 200


def test_the_worker_refuses_sounds_too_short_to_encode(hearing: LiveServer) -> None:
    """The server never sends such input; mtmd would abort the worker on it."""
    from engine.client import RequestFailed
    from engine.protocol import MediaInput, SamplingParams

    assert chat(hearing, ask(audio_part(wav(0.2))), model=AUDIO_MODEL).status_code == 200
    worker = next(w for w in hearing.loader.live() if w.info.media == ("audio",))
    prompt = worker.tokenize("Hello there", add_special=True)
    for samples, rate in ((1, 16000), (100, 16000), (20, 10)):
        sound = MediaInput(1, "audio", samples, rate, b"\0" * 4 * samples, b"s" * 32, "messages[0].content[0]")
        with pytest.raises(RequestFailed) as refused:
            "".join(worker.generate(prompt, SamplingParams(max_tokens=2), (sound,)))
        assert refused.value.kind == "invalid_request"
    assert chat(hearing, ask(audio_part(wav(0.2))), model=AUDIO_MODEL).status_code == 200
    assert worker in hearing.loader.live()


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_sample_widths_decode_to_the_same_tone(width: int) -> None:
    reference = decode_audio(base64.b64encode(wav(0.1, 8000, 1, 2)).decode(), "wav", MediaLimits(), "p")
    decoded = decode_audio(base64.b64encode(wav(0.1, 8000, 2, width)).decode(), "wav", MediaLimits(), "p")
    assert (decoded.kind, decoded.width, decoded.height) == ("audio", 800, 8000)
    tolerance = 0.02 if width == 1 else 1e-3
    assert np.allclose(np.frombuffer(decoded.data, np.float32), np.frombuffer(reference.data, np.float32),
                       atol=tolerance)
    with pytest.raises(InvalidRequest):
        decode_audio(base64.b64encode(wav(0.1, 8000, 1, width)).decode(), "wav", MediaLimits(max_audio_bytes=100), "p")


def test_one_request_holds_at_most_max_media_per_request_different_pictures(make_server, vision_dir: Path) -> None:
    """Small files can decode to tens of megabytes each: a cap per request, pictures sent again
    (a conversation's history) counted and decoded once."""
    server = make_server(manager={"max_media_per_request": 2})
    first, second, third = (image_part(picture(seed)) for seed in (1, 2, 3))
    history = [*ask(first), {"role": "assistant", "content": "A picture."}, *ask(first, second)]
    assert chat(server, history, max_tokens=2).status_code == 200
    refused = chat(server, ask(first, second, third), max_tokens=2)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["code"] == "too_many_media", error
    assert error["param"] == "messages[0].content[3]" and "max_media_per_request" in error["message"]
