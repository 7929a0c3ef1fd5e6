"""Stored Responses: what ``store`` keeps and ``previous_response_id`` continues from.

One SQLite file, ``<server.data_directory>/responses.db``, created on the first response
stored (building an app touches no disk). Each row holds a response as it was answered and
the whole conversation that was its input (earlier turns included), so a continuation needs
that one row: its conversation, its output, then the new turn. Rows are bounded by
``server.responses_max_count`` (the newest kept) and ``server.responses_max_age`` (seconds);
both are enforced each time a response is stored, and an expired row is never returned.

Concurrency: one connection per store, opened lazily and shared by the server's threads
(``check_same_thread=False``); ``_lock`` serialises every use of it, and each operation is
one short transaction on a few rows, so no thread waits long and pruning is atomic with the
insert it follows. Nothing here waits on anything but the disk.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import ServiceError

log = logging.getLogger(__name__)
FILE_NAME = "responses.db"
_SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, response TEXT NOT NULL, items TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);"""


@dataclass
class StoredResponse:
    """A stored response and the conversation items it answered, oldest first."""

    response: dict[str, Any]
    items: list[dict[str, Any]]


class ResponseStore:
    """Responses kept in SQLite, bounded by count and age (see the module docstring)."""

    def __init__(self, directory: Path, max_count: int, max_age: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = directory / FILE_NAME
        self.max_count = max_count
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Store ``response`` (by its ``id``) with its input ``items``, then drop what is now
        too old or past the count. With ``max_count`` 0 nothing is stored."""
        if self.max_count == 0:
            return
        now = self._clock()
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                       (response["id"], now, _dumps(response), _dumps(items)))
            db.execute("DELETE FROM responses WHERE created_at < ?", (now - self.max_age,))
            db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses "
                       "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)", (self.max_count,))

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response ``response_id``, or None (never stored, deleted, pruned or expired)."""
        with self._transaction() as db:
            row = db.execute("SELECT response, items FROM responses WHERE id = ? AND created_at >= ?",
                             (response_id, self._clock() - self.max_age)).fetchone()
        return None if row is None else StoredResponse(json.loads(row[0]), json.loads(row[1]))

    def delete(self, response_id: str) -> bool:
        """Forget ``response_id``; False if it was not there."""
        with self._transaction() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def count(self) -> int:
        """Rows stored now (expired ones included until the next store prunes them)."""
        with self._transaction() as db:
            return db.execute("SELECT count(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        """Close the connection (a later use opens it again)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, under ``_lock``, in one transaction (committed unless the body raises);
        a SQLite failure becomes a service error (the log has the detail)."""
        with self._lock:
            try:
                db = self._connection()
                with db:
                    yield db
            except (sqlite3.Error, OSError) as exc:  # OSError: the folder cannot be made
                raise _failure(self, exc) from None

    def _connection(self) -> sqlite3.Connection:
        """The open connection; caller holds ``_lock``."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False)
            db.executescript(_SCHEMA)
            self._db = db
            log.info("response store opened path=%s max_count=%d max_age=%.0f", self.path, self.max_count,
                     self.max_age)
        return self._db


def _failure(store: ResponseStore, exc: Exception) -> ServiceError:
    log.error("response store failed path=%s error=%s", store.path, exc)
    return ServiceError(f"The response store failed ({exc.__class__.__name__}); see the server log",
                        code="store_failed")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
