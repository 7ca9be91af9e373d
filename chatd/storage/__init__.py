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

HISTORY_COLUMNS = "room, id, name, account, msg, ts, mentions"

MAX_ROOMS = 50  # SPEC: rooms per session (an account's: per account), general and direct rooms included
COUNT_CAP = 1000  # SPEC: `unread` and `mentions` are counted up to this
DEFAULT_ROOM = "general"  # where a new session, or an account that never joined anything, is


def owner_key(account: str | None, member_id: str) -> str:
    """Whose rooms and read markers: an account's (every session of it), else the guest session's.

    Keyed by the session's public member id, never by the cookie's `sid`. Also stored as
    a message's `author`, so that `unread` leaves out the reader's own messages.
    """
    return "a:" + account.lower() if account is not None else "s:" + member_id


class TooManyRooms(Exception):
    """`join_room` would put an owner over MAX_ROOMS."""


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
    "messages": ("room", "id", "name", "account", "msg", "ts", "author", "mentions"),
    "room_counters": ("room", "last_id"),  # after messages: a copy's counters are never behind its ids
    "revoked_sessions": ("sid", "until"),
    "room_owners": ("owner",),
    "memberships": ("owner", "room", "read_id"),
    "mentions": ("account", "room", "id"),
}
PRIMARY_KEYS: dict[str, str] = {
    "accounts": "username_key",
    "room_counters": "room",
    "messages": "room, id",
    "revoked_sessions": "sid",
    "room_owners": "owner",
    "memberships": "owner, room",
    "mentions": "account, room, id",
}


def room_state(row) -> dict:
    room, read_id, last_id, unread, mentions = row
    return {"room": room, "last_id": last_id, "read_id": read_id, "unread": unread, "mentions": mentions}


def mention_rows(message: dict) -> list[tuple[str, str, int]]:
    """(account key, room, id) for each account a stored message mentions, its author excepted."""
    author = message.get("author")
    return [
        (name.lower(), message["room"], message["id"])
        for name in message.get("mentions") or ()
        if "a:" + name.lower() != author
    ]


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
    async def add_message(
        self,
        room: str,
        name: str,
        account: str | None,
        msg: str,
        ts: float,
        *,
        author: str | None = None,
        mentions: tuple[str, ...] | list[str] = (),
    ) -> dict:
        """Store a message durably and return it with its id (Message shape of SPEC).

        `author` is its writer's `owner_key`: in the same transaction the writer's read
        marker in the room moves to it. `mentions` are canonical usernames (`resolve_mentions`).
        """

    @abc.abstractmethod
    async def history(
        self, room: str, *, before: int | None = None, after: int | None = None, limit: int = HISTORY_DEFAULT
    ) -> list[dict]:
        """Messages of a room, oldest first: the latest, those just before `before`, or the first after `after`."""

    # -- rooms of a person, read markers -------------------------------------------

    @abc.abstractmethod
    async def room_states(self, owner: str, room: str | None = None) -> list[dict]:
        """RoomState of each of the owner's rooms, sorted by name (only `room`'s, if given).

        An owner never seen before is first put in `general`. One query: per room an
        indexed, bounded count of unread messages and of mentions of the account.
        """

    @abc.abstractmethod
    async def join_room(self, owner: str, room: str) -> bool:
        """Add a room to the owner's rooms, marked read up to its last message; False when
        it is there already. Raises TooManyRooms."""

    @abc.abstractmethod
    async def leave_room(self, owner: str, room: str) -> bool:
        """Remove a room from the owner's rooms; False when it was not there."""

    @abc.abstractmethod
    async def mark_read(self, owner: str, room: str, message_id: int) -> tuple[dict, bool] | None:
        """Move the owner's marker forward to `message_id` (at most the room's last id): its
        RoomState and whether it moved, or None when the room is not among the owner's rooms."""

    @abc.abstractmethod
    async def usernames(self, keys: list[str]) -> dict[str, str]:
        """Lower-cased username -> canonical username, for those of `keys` that are accounts."""

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
