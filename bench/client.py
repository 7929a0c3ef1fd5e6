"""The client side: cheap reading of SSE streams, JSON posts, and /health probes.

Streams go over ``http.client`` with one keep-alive connection per thread. ``read1``
hands back whatever bytes arrived, so the loop per read is: take the time, append,
look at the last few bytes for ``[DONE]``. Events are parsed only until the first
token is seen (for time-to-first-token) and once more after the end (for the counts),
never in between, so the client costs the server's side of the comparison next to
nothing. Everything else goes through a per-thread ``requests.Session`` (keep-alive).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

DONE = b"data: [DONE]"
READ_SIZE = 1 << 16


class BenchError(RuntimeError):
    """A request the benchmark needs failed; the message says which and why."""


@dataclass
class StreamResult:
    """One streamed completion, timed from the request being sent."""

    seconds: float  # until [DONE] (or the end of the body when a server sends none)
    first_token: float | None  # until the first event carrying text
    completion_tokens: int  # usage.completion_tokens when reported, else the content chunks
    content_chunks: int
    usage_reported: bool
    prompt_tokens: int | None = None  # usage.prompt_tokens, when reported
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    text: str = ""  # the generated text, all chunks joined

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds


class Endpoint:
    """One OpenAI-compatible server at ``base_url`` (its root; a trailing ``/v1`` is dropped)."""

    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._https = parts.scheme == "https"
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path
        self.timeout = timeout
        self._local = threading.local()

    def stream(self, path: str, body: dict[str, Any],
               on_first_token: Callable[[], None] | None = None) -> StreamResult:
        """POST ``body`` to ``path`` and read the event stream to its end.

        ``on_first_token`` is called (on this thread) as soon as the first text arrives.
        """
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        for attempt in range(2):
            conn = self._connection()
            started = time.perf_counter()
            try:
                conn.request("POST", self._prefix + path, body=payload, headers=headers)
                response = conn.getresponse()
                break
            except (ConnectionError, http.client.HTTPException):
                conn.close()  # the server closed the idle keep-alive connection: reconnect once
                if attempt:
                    raise
        if response.status != 200:
            raise BenchError(f"POST {path}: HTTP {response.status}: {response.read()[:300]!r}")
        buffer, seconds, first = _read_events(response, started, on_first_token)
        return _summarize(path, buffer, seconds, first)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON and return the JSON answer; any status but 200 is a ``BenchError``."""
        response = self.session().post(self.base_url + path, json=body, timeout=self.timeout)
        if response.status_code != 200:
            raise BenchError(f"POST {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def probe(self, path: str = "/health") -> float:
        """Seconds for one GET of ``path`` (which must answer 200)."""
        session = self.session()
        started = time.perf_counter()
        response = session.get(self.base_url + path, timeout=self.timeout)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchError(f"GET {path}: HTTP {response.status_code}: {response.text[:300]}")
        return seconds

    def session(self) -> requests.Session:
        """This thread's keep-alive session."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = kind(self._host, self._port, timeout=self.timeout)
        return conn


def _read_events(response: http.client.HTTPResponse, started: float,
                 on_first_token: Callable[[], None] | None = None) -> tuple[bytes, float, float | None]:
    """Read until ``[DONE]``; return the bytes, the seconds to the end, and to the first token."""
    buffer = bytearray()
    first: float | None = None
    scanned = 0
    while True:
        data = response.read1(READ_SIZE)
        now = time.perf_counter()
        if not data:
            break
        buffer += data
        if first is None:
            found, scanned = _scan_for_text(buffer, scanned)
            first = now - started if found else None
            if found and on_first_token is not None:
                on_first_token()
        if buffer[-24:].rstrip().endswith(DONE):
            break
    response.read()  # the closing chunk, so the connection can be reused
    return bytes(buffer), now - started, first


def _scan_for_text(buffer: bytearray, start: int) -> tuple[bool, int]:
    """Whether a complete event from offset ``start`` on carries text; and where scanning stopped."""
    while True:
        end = buffer.find(b"\n\n", start)
        if end < 0:
            return False, start
        event, start = bytes(buffer[start:end]).strip(), end + 2
        if event.startswith(b"data:") and not event.endswith(DONE) and _text(json.loads(event[5:])):
            return True, start


def _text(event: dict[str, Any]) -> str:
    for choice in event.get("choices") or ():
        text = choice.get("text") or (choice.get("delta") or {}).get("content")
        if text:
            return text
    return ""


def _summarize(path: str, buffer: bytes, seconds: float, first: float | None) -> StreamResult:
    chunks, completion_tokens = 0, None
    prompt_tokens = cached_tokens = None
    texts: list[str] = []
    for event in buffer.replace(b"\r\n", b"\n").split(b"\n\n"):
        event = event.strip()
        if not event.startswith(b"data:") or event.endswith(DONE):
            continue
        data = json.loads(event[5:])
        if "error" in data:
            raise BenchError(f"POST {path}: error event in the stream: {data['error']}")
        text = _text(data)
        chunks += bool(text)
        texts.append(text)
        usage = data.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            completion_tokens = int(usage["completion_tokens"])
            prompt_tokens = usage.get("prompt_tokens")
            cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    tokens = chunks if completion_tokens is None else completion_tokens
    return StreamResult(seconds, first, tokens, chunks, completion_tokens is not None, prompt_tokens, cached_tokens,
                        "".join(texts))
