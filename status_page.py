"""The status page: one static HTML page at ``/`` with its script and style under ``/ui``.

The page itself is public; everything it shows comes from the API (``/admin/models``,
``/admin/events``, ``/v1/chat/completions``), which asks for a key when one is configured.
No build step: the files in ``static/`` are what the browser gets.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

STATIC = Path(__file__).resolve().parent / "static"

# The page loads only its own script and style and talks only to this server; it may not
# be framed, so nobody can overlay the Load and Unload buttons.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

bp = Blueprint("status_page", __name__, static_folder=STATIC, static_url_path="/ui")


@bp.get("/")
def index() -> Response:
    """The status page: every model with Load/Unload buttons, live updates, a chat box."""
    response = bp.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
