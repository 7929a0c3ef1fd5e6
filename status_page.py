"""The status page: one static HTML page at ``/`` with its scripts and style under ``/ui``.

The page itself is public; everything it shows comes from the API (``/admin/stats``,
``/admin/models``, ``/admin/events``, ``/v1/chat/completions``), which asks for a key when
one is configured. No build step: the files in ``static/`` are what the browser gets.

Caching: every file is sent with ``Cache-Control: no-cache`` and an ``ETag``, so a browser
keeps its copy but asks each time (a 304 when nothing changed): an upgraded server is never
shown with a stale script, and no asset needs a versioned name.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

STATIC = Path(__file__).resolve().parent / "static"

# The page loads only its own scripts and style and talks only to this server; it may not
# be framed, so nobody can overlay the Load and Unload buttons. No inline script or style:
# model output can never become code, even if something rendered it as HTML.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
}

bp = Blueprint("status_page", __name__, static_folder=STATIC, static_url_path="/ui")


@bp.get("/")
def index() -> Response:
    """The status page: memory, models with Load/Unload buttons, activity, events, a chat."""
    return bp.send_static_file("index.html")


@bp.after_request
def _headers(response: Response) -> Response:
    """The page's headers on the page and on every file it loads (304s included)."""
    response.headers.update(HEADERS)
    return response
