"""Durable state: accounts, messages and revoked session ids.

`Storage` is the whole interface the rest of chatd uses; one module per
backend implements it (`sqlite.py`, `postgres.py`). The app factory picks
the backend from the configuration.

Message ids are per room and gapless: each room has a counter, advanced in the
same transaction that inserts the message, so within a room a message never
becomes visible after one with a higher id, whichever process stored it.

Revisions work the same way: the counter row also holds the room's last `rev`,
and every new message, edit and delete takes the next one in the transaction
that makes the change (the row lock orders a room's writers, so revisions
commit in order too). A message row carries the rev of its latest change; a
deleted one stays as a tombstone — no name, no text — so `history` `since` can
report the deletion.

`client_id`s: a send's key (author, room, client_id) is kept for a day with the
id and rev it got, under a primary key: a repeat finds it instead of storing
again, and two at once cannot both insert it.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator
from dataclasses import dataclass

if TYPE_CHECKING:
    from .group_commit import GroupCommit

HISTORY_DEFAULT = 50
HISTORY_MAX = 100
MAX_ID = 2**63 - 1

CLIENT_ID_SECONDS = 24 * 3600  # SPEC: a client_id repeated within 24 hours is the same send
CLIENT_ID_PRUNE_EVERY = 600.0  # seconds between removals of expired client_ids

log = logging.getLogger("chatd.storage")

HISTORY_COLUMNS = "room, id, name, account, msg, ts, rev, edited"


def history_query(
    room: str, before: int | None, after: int | None, limit: int, since: int | None = None
) -> tuple[str, tuple, bool]:
    """The one paging rule of `history`, for every backend.

    The SQL with `{}` for each parameter (a backend fills in its own marks), its
    arguments, and whether the rows come newest first and must be reversed.
    Deleted messages are left out, except from `since`, which reports them
    (the last column says which rows are deletions).
    """
    if since is not None:
        return (
            f"SELECT {HISTORY_COLUMNS}, deleted FROM messages WHERE room = {{}} AND rev > {{}} ORDER BY rev ASC LIMIT {{}}",
            (room, since, limit),
            False,
        )
    select = f"SELECT {HISTORY_COLUMNS} FROM messages WHERE room = {{}} AND NOT deleted"
    if after is not None:
        return f"{select} AND id > {{}} ORDER BY id ASC LIMIT {{}}", (room, after, limit), False
    if before is not None:
        return f"{select} AND id < {{}} ORDER BY id DESC LIMIT {{}}", (room, before, limit), True
    return f"{select} ORDER BY id DESC LIMIT {{}}", (room, limit), True

def message_dict(room: str, id_: int, name: str, account: str | None, msg: str, ts: float, rev: int, edited) -> dict:
    """SPEC's Message."""
    return {"id": id_, "room": room, "name": name, "account": account, "msg": msg, "ts": ts, "rev": rev, "edited": edited}


def deletion(room: str, id_: int, rev: int) -> dict:
    """What `history` `since` reports for a deleted message."""
    return {"room": room, "id": id_, "rev": rev, "deleted": True}


class ChangeRefused(Exception):
    """An edit or delete storage turned down: `code` is SPEC's (`not_found`, `forbidden`)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# Every table's columns, in the order `dump` yields and `load` takes them (copy-data).
TABLES: dict[str, tuple[str, ...]] = {
    "accounts": ("username", "username_key", "password_hash", "created"),
    "messages": ("room", "id", "name", "account", "msg", "ts", "rev", "edited", "author", "deleted"),
    "room_counters": ("room", "last_id", "last_rev"),  # after messages: a copy's counters are never behind its ids
    "client_ids": ("author", "room", "client_id", "id", "rev", "created"),
    "revoked_sessions": ("sid", "until"),
}
PRIMARY_KEYS: dict[str, str] = {
    "accounts": "username_key",
    "room_counters": "room",
    "messages": "room, id",
    "client_ids": "author, room, client_id",
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

    # Every backend stores new messages through a GroupCommit (group_commit.py) of its own.
    _group_commit: "GroupCommit"

    async def add_message(
        self,
        room: str,
        name: str,
        account: str | None,
        msg: str,
        ts: float,
        *,
        author: str | None = None,
        client_id: str | None = None,
    ) -> dict:
        """Store a message durably and return it with its id and rev (Message shape of SPEC).

        `author` is who may edit it (an account or a session, see Identity.author);
        with `client_id` too, a repeat of a send kept for the last day stores
        nothing and returns `{"room","id","rev","duplicate": True}` of the first.
        """
        return await self._group_commit.submit(
            {"room": room, "name": name, "account": account, "msg": msg, "ts": ts, "author": author, "client_id": client_id}
        )

    async def edit_message(self, room: str, id_: int, author: str | None, msg: str, now: float) -> dict:
        """Replace a message's text (its author only), under the room's next rev; the new Message.

        Raises ChangeRefused("not_found") for no such (or a deleted) message, ("forbidden") for another author.
        """
        return await self._change(room, id_, author, msg, now, False)

    async def delete_message(self, room: str, id_: int, author: str | None, *, any_author: bool = False) -> dict:
        """Erase a message (its author's, or anyone's with `any_author`), under the room's next rev.

        The text is gone from storage when this returns; `{"room","id","rev"}`. ChangeRefused as for edits.
        """
        return await self._change(room, id_, author, None, 0.0, any_author)

    @abc.abstractmethod
    async def _change(
        self, room: str, id_: int, author: str | None, msg: str | None, now: float, any_author: bool
    ) -> dict:
        """An edit (`msg`) or a delete (`msg` None) in one transaction with the room's next rev."""

    async def history(
        self,
        room: str,
        *,
        before: int | None = None,
        after: int | None = None,
        since: int | None = None,
        limit: int = HISTORY_DEFAULT,
    ) -> list[dict]:
        """Messages of a room, oldest first: the latest, those just before `before`, or the first after `after`;
        or with `since`, the changes after that rev in rev order (Messages and deletions)."""
        template, args, newest_first = history_query(room, before, after, limit, since)
        rows = await self._history_rows(template, args, changes=since is not None)
        if newest_first:
            rows.reverse()
        return rows

    @abc.abstractmethod
    async def _history_rows(self, template: str, args: tuple, *, changes: bool) -> list[dict]:
        """Run a `history_query` (`{}` for each parameter); rows as Messages (and deletions, for `changes`)."""

    @abc.abstractmethod
    async def revision(self, room: str) -> tuple[int, int]:
        """The room's highest message id and its current rev (0, 0 for a room without messages)."""

    @abc.abstractmethod
    async def prune_client_ids(self, before: float) -> int:
        """Forget client_ids kept since before `before`; how many."""

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


async def prune_client_ids_forever(storage: Storage, every: float = CLIENT_ID_PRUNE_EVERY) -> None:
    """Remove expired client_ids now and every `every` seconds (a background task of the app's;
    a key past its day is ignored by sends anyway, so a missed round only costs space)."""
    while True:
        try:
            removed = await storage.prune_client_ids(time.time() - CLIENT_ID_SECONDS)
            if removed:
                log.debug("removed %d expired client_ids", removed)
        except StorageError as exc:
            log.warning("could not remove expired client_ids: %s", exc)
        await asyncio.sleep(every)
