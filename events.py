"""Lifecycle events fanned out to live subscribers (``GET /admin/events``).

Publishing never blocks: the manager publishes while holding a model's lock, so each
subscriber has a bounded queue and a slow reader loses its oldest events, not the
server its speed. Every event is also kept in a short history for new subscribers.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

HISTORY = 100
QUEUE_SIZE = 1000


class EventBus:
    """Publish lifecycle events to any number of subscribers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[queue.Queue[dict[str, Any]]] = set()
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(event)`` synchronously on every publish; it must be quick and not block."""
        with self._lock:
            self._listeners.append(listener)

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send one event (``kind`` plus fields) to every subscriber; returns it."""
        with self._lock:
            event = {"id": next(self._ids), "event": kind, "time": round(time.time(), 3), **fields}
            self._history.append(event)
            for listener in self._listeners:
                listener(event)
            for subscriber in self._subscribers:
                if subscriber.full():
                    subscriber.get_nowait()  # drop the oldest for a reader that fell behind
                subscriber.put_nowait(event)
        return event

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        """A new queue that receives every event published from now on."""
        subscriber: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_SIZE)
        with self._lock:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def history(self) -> list[dict[str, Any]]:
        """The most recent events, oldest first."""
        with self._lock:
            return list(self._history)
