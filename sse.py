"""Server-Sent Events encoding for OpenAI-style streams, built for the per-token path.

A content chunk differs from the previous one only in its text, so each stream
pre-encodes the constant bytes around the text once and pays one ``json.dumps`` of the
text per token.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MIMETYPE = "text/event-stream"
LOADING_COMMENT_INTERVAL = 2.0  # seconds between ": loading" comments while a model loads


def comment(text: str) -> bytes:
    """An SSE comment line: ignored by clients, but it keeps the connection visibly alive."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event holding ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def typed_event(payload: dict[str, Any]) -> bytes:
    """An event named by its payload's ``type`` (``event: <type>`` then ``data:``), as OpenAI's
    Responses stream writes them; clients that read only ``data:`` see the same JSON."""
    return b"event: " + str(payload["type"]).encode() + b"\n" + event(payload)


class ChunkTemplate:
    """Encodes ``{"choices": [{"<delta path>": <text>}]}`` chunks by splicing the text in."""

    MARK = "\x00TEXT\x00"

    def __init__(self, shape: dict[str, Any]) -> None:
        encoded = json.dumps(shape, separators=(",", ":"), ensure_ascii=False)
        quoted_mark = json.dumps(self.MARK)
        before, after = encoded.split(quoted_mark)
        self._before = b"data: " + before.encode()
        self._after = after.encode() + b"\n\n"

    def render(self, text: str) -> bytes:
        """The event for one piece of text."""
        return self._before + json.dumps(text, ensure_ascii=False).encode() + self._after
