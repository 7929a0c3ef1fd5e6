"""The waitress server around the app, with a connection limit that answers instead of hanging.

waitress stops accepting at ``connection_limit``, so the next client waits in the kernel's
queue with no word of why. We let waitress accept a little past the limit and answer
those extra connections ourselves with a 503 in OpenAI's error shape, then close them;
beyond that headroom waitress's own hard stop still protects the file descriptors.
"""

from __future__ import annotations

import json
import logging
import types
from typing import Any

from flask import Flask
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

from config import ServerSettings
from errors import error_body

log = logging.getLogger(__name__)

REFUSAL_HEADROOM = 32  # connections answered with 503 before waitress stops accepting at all
_REFUSAL_BODY = json.dumps(error_body(
    "Too many open connections to this server; retry shortly", "server_error", None, "too_many_connections"))
REFUSAL = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           f"Connection: close\r\nContent-Length: {len(_REFUSAL_BODY)}\r\n\r\n{_REFUSAL_BODY}").encode()


def build_wsgi_server(app: Flask, settings: ServerSettings) -> Any:
    """A waitress server for ``app``, bound and listening (raises OSError if the port is taken)."""
    server = create_server(
        app, host=settings.host, port=settings.port, threads=settings.threads,
        # waitress counts its listening sockets and wake-up pipe as connections too
        connection_limit=settings.connection_limit + REFUSAL_HEADROOM,
        # Flask answers oversize bodies with a JSON 413; waitress only stops absurd ones.
        max_request_body_size=settings.max_request_body * 2 + 65536,
        # Lets waitress notice a client that hung up while its stream is generating.
        channel_request_lookahead=1, ident="llama-cpp-server", clear_untrusted_proxy_headers=True)
    for listener in [s for s in socket_map(server).values() if isinstance(s, BaseWSGIServer)]:
        listener.handle_accept = types.MethodType(_accept_or_refuse(settings.connection_limit), listener)
    return server


def socket_map(server: Any) -> dict[int, Any]:
    """Every socket waitress polls: one listener, or several when the host resolved to several
    addresses (``localhost`` as ``::1`` and ``127.0.0.1``: waitress then returns a
    ``MultiSocketServer``, which keeps its map under another name)."""
    return server.map if isinstance(server, MultiSocketServer) else server._map


def listen_addresses(server: Any) -> list[tuple[str, int]]:
    """The (host, port) pairs the server really listens on."""
    if isinstance(server, MultiSocketServer):
        return [(host, port) for host, port in server.effective_listen]
    return [(server.effective_host, server.effective_port)]


def _accept_or_refuse(limit: int) -> Any:
    def handle_accept(self: BaseWSGIServer) -> None:
        open_connections = sum(isinstance(c, HTTPChannel) for c in self._map.values())
        if open_connections < limit:
            BaseWSGIServer.handle_accept(self)
            return
        try:
            accepted = self.accept()
        except OSError:
            return
        if accepted is None:
            return
        connection, address = accepted
        log.warning("connection refused client=%s open_connections=%d limit=%d", address, open_connections, limit)
        try:
            connection.setblocking(True)
            connection.settimeout(1.0)
            connection.sendall(REFUSAL)
        except OSError:
            pass
        finally:
            connection.close()

    return handle_accept
