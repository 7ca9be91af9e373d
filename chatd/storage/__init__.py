"""Durable state: accounts, messages and revoked session ids.

`Storage` is the whole interface the rest of chatd uses; one module per
backend implements it (`sqlite.py`, `postgres.py`). The app factory picks
the backend from the configuration.

Message ids are per room and gapless: each room has a counter, advanced in the
same transaction that inserts the message, so within a room a message never
becomes visible after one with a higher id, whichever process stored it.
"""

from __future__ import annotations

import abc
from typing import AsyncIterator
from dataclasses import dataclass

HISTORY_DEFAULT = 50
HISTORY_MAX = 100
MAX_ID = 2**63 - 1

HISTORY_COLUMNS = "room, id, name, account, msg, ts"


def history_query(room: str, before: int | None, after: int | None, limit: int) -> tuple[str, tuple, bool]:
    """The one paging rule of `history`, for every backend.

    The SQL with `{}` for each parameter (a backend fills in its own marks), its
    arguments, and whether the rows come newest first and must be reversed.
    """
    select = f"SELECT {HISTORY_COLUMNS} FROM messages WHERE room = {{}}"
    if after is not None:
        return f"{select} AND id > {{}} ORDER BY id ASC LIMIT {{}}", (room, after, limit), False
    if before is not None:
        return f"{select} AND id < {{}} ORDER BY id DESC LIMIT {{}}", (room, before, limit), True
    return f"{select} ORDER BY id DESC LIMIT {{}}", (room, limit), True

# Every table's columns, in the order `dump` yields and `load` takes them (copy-data).
TABLES: dict[str, tuple[str, ...]] = {
    "accounts": ("username", "username_key", "password_hash", "created"),
    "messages": ("room", "id", "name", "account", "msg", "ts"),
    "room_counters": ("room", "last_id"),  # after messages: a copy's counters are never behind its ids
    "revoked_sessions": ("sid", "until"),
}
PRIMARY_KEYS: dict[str, str] = {
    "accounts": "username_key",
    "room_counters": "room",
    "messages": "room, id",
    "revoked_sessions": "sid",
}


class StorageError(Exception):
    """Storage is unreachable or broken."""


OUTAGE_RETRY_AFTER = 5  # seconds: what clients are told to wait while storage is unreachable


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    password_hash: str


class Storage(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StorageError when storage cannot answer."""

    @abc.abstractmethod
    async def add_message(self, room: str, name: str, account: str | None, msg: str, ts: float) -> dict:
        """Store a message durably and return it with its id (Message shape of SPEC)."""

    @abc.abstractmethod
    async def history(
        self, room: str, *, before: int | None = None, after: int | None = None, limit: int = HISTORY_DEFAULT
    ) -> list[dict]:
        """Messages of a room, oldest first: the latest, those just before `before`, or the first after `after`."""

    @abc.abstractmethod
    async def create_account(self, username: str, password_hash: str) -> bool:
        """False when the username is taken (compared without regard to case)."""

    @abc.abstractmethod
    async def find_account(self, username: str) -> Account | None: ...

    @abc.abstractmethod
    async def revoke_session(self, sid: str, until: int) -> None:
        """Remember a revoked sid until its cookie would have expired anyway."""

    @abc.abstractmethod
    async def is_revoked(self, sid: str) -> bool: ...

    # -- bulk access, for copy-data and tests --------------------------------

    @abc.abstractmethod
    async def count(self, table: str) -> int: ...

    @abc.abstractmethod
    def dump(self, table: str, batch_size: int = 5000) -> AsyncIterator[list[tuple]]:
        """All rows of a table (columns as in TABLES) in primary-key order, in batches."""

    @abc.abstractmethod
    async def load(self, table: str, rows: list[tuple]) -> None:
        """Insert rows as they are (ids included) in one transaction; counters are rows of room_counters."""

    @abc.abstractmethod
    async def clear(self) -> None:
        """Delete every row of every table (the schema stays)."""
