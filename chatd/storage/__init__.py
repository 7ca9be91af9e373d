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

import orjson

if TYPE_CHECKING:
    from .group_commit import GroupCommit

HISTORY_DEFAULT = 50
HISTORY_MAX = 100
MAX_ID = 2**63 - 1

CLIENT_ID_SECONDS = 24 * 3600  # SPEC: a client_id repeated within 24 hours is the same send
CLIENT_ID_PRUNE_EVERY = 600.0  # seconds between removals of expired client_ids

log = logging.getLogger("chatd.storage")

HISTORY_COLUMNS = "room, id, name, account, msg, ts, rev, edited, mentions"

MAX_ROOMS = 50  # SPEC: rooms per session (an account's: per account), general and direct rooms included
COUNT_CAP = 1000  # SPEC: `unread` and `mentions` are counted up to this
DEFAULT_ROOM = "general"  # where a new session, or an account that never joined anything, is


def owner_key(account: str | None, member_id: str) -> str:
    """Whose rooms, read markers, messages and client_ids: an account's (every session of it),
    else the guest session's.

    Keyed by the session's public member id, never by the cookie's `sid`. Stored as a
    message's `author`: who may edit and delete it, and whose `unread` leaves it out.
    """
    return "a:" + account.lower() if account is not None else "s:" + member_id


class TooManyRooms(Exception):
    """`join_room` would put an owner over MAX_ROOMS."""


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


def message_dict(
    room: str, id_: int, name: str, account: str | None, msg: str, ts: float, rev: int, edited, mentions
) -> dict:
    """SPEC's Message (`mentions` a list, or as stored: see `stored_mentions`)."""
    return {
        "id": id_, "room": room, "name": name, "account": account, "msg": msg, "ts": ts,
        "rev": rev, "edited": edited, "mentions": stored_mentions(mentions),
    }  # fmt: skip


def stored_mentions(value) -> list[str]:
    """A message's mentions from its `mentions` column (JSON text, NULL for none) or a list."""
    if isinstance(value, (str, bytes)):
        return orjson.loads(value)
    return list(value or ())


def mentions_json(mentions: list[str] | tuple[str, ...]) -> str | None:
    """How a message's mentions are stored: a JSON list, NULL when there are none."""
    return orjson.dumps(list(mentions)).decode() if mentions else None


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
    "messages": ("room", "id", "name", "account", "msg", "ts", "rev", "edited", "author", "deleted", "mentions"),
    "room_counters": ("room", "last_id", "last_rev"),  # after messages: a copy's counters are never behind its ids
    "client_ids": ("author", "room", "client_id", "id", "rev", "created"),
    "revoked_sessions": ("sid", "until"),
    "room_owners": ("owner",),
    "memberships": ("owner", "room", "read_id"),
    "mentions": ("account", "room", "id"),
    "room_info": ("room", "owner", "topic"),
    "moderators": ("room", "account"),
    "sanctions": ("room", "target", "muted_until", "banned"),
    "audit": ("seq", "ts", "actor", "action", "target", "room", "message_id", "detail"),
}
PRIMARY_KEYS: dict[str, str] = {
    "accounts": "username_key",
    "room_counters": "room",
    "messages": "room, id",
    "client_ids": "author, room, client_id",
    "revoked_sessions": "sid",
    "room_owners": "owner",
    "memberships": "owner, room",
    "mentions": "account, room, id",
    "room_info": "room",
    "moderators": "room, account",
    "sanctions": "room, target",
    "audit": "seq",
}


def room_state(row) -> dict:
    room, read_id, last_id, unread, mentions = row
    return {"room": room, "last_id": last_id, "read_id": read_id, "unread": unread, "mentions": mentions}


def mention_rows(room: str, id_: int, author: str | None, mentions) -> list[tuple[str, str, int]]:
    """(account key, room, id) for each account a stored message mentions, its author excepted."""
    return [(name.lower(), room, id_) for name in mentions or () if "a:" + name.lower() != author]


def is_direct(room: str) -> bool:
    """A direct room `@alice+bob` (validation.py checks the rest of the name)."""
    return room.startswith("@")


def direct_pair(room: str) -> tuple[str, str]:
    """The two (lower-case) usernames of a direct room."""
    first, second = room[1:].split("+")
    return first, second


# The moderation log, newest first (`python -m chatd audit`); `{}` marks as in history_query.
AUDIT_COLUMNS = "ts, actor, action, target, room, message_id, detail"


def audit_query(room: str | None, limit: int) -> tuple[str, tuple]:
    if room is None:
        return f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT {{}}", (limit,)
    return f"SELECT {AUDIT_COLUMNS} FROM audit WHERE room = {{}} ORDER BY seq DESC LIMIT {{}}", (room, limit)


def audit_entry(row) -> dict:
    return dict(zip(("ts", "actor", "action", "target", "room", "message_id", "detail"), row))


# The directory: public rooms in somebody's rooms, from memberships (indexed by room)
# grouped by room; the newest message's ts by the (room, id) index. `{}` marks: the
# caller's owner key (its bans hide rooms), then the name pattern if any, then the limit.
DIRECTORY = """
SELECT m.room, count(*) AS members, max(i.topic),
    (SELECT x.ts FROM messages x WHERE x.room = m.room AND NOT x.deleted ORDER BY x.id DESC LIMIT 1)
FROM memberships m LEFT JOIN room_info i ON i.room = m.room
WHERE m.room NOT LIKE '@%' AND m.room NOT IN (SELECT s.room FROM sanctions s WHERE s.target = {} AND s.banned = 1)
    NAME_FILTER
GROUP BY m.room ORDER BY members DESC, m.room LIMIT {}
"""


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
        mentions: tuple[str, ...] | list[str] = (),
    ) -> dict:
        """Store a message durably and return it with its id and rev (Message shape of SPEC).

        `author` is its writer's `owner_key`: who may edit it, and in the same transaction
        the writer's read marker in the room moves to it. `mentions` are canonical usernames
        (`mentions.resolve`). With `client_id` too, a repeat of a send kept for the last day
        stores nothing (no marker moves, no mention is recorded) and returns
        `{"room","id","rev","duplicate": True}` of the first.
        """
        return await self._group_commit.submit(
            {
                "room": room, "name": name, "account": account, "msg": msg, "ts": ts,
                "author": author, "client_id": client_id, "mentions": list(mentions),
            }
        )  # fmt: skip

    async def edit_message(
        self, room: str, id_: int, author: str | None, msg: str, now: float, mentions: tuple[str, ...] | list[str] = ()
    ) -> dict:
        """Replace a message's text (its author only) and its `mentions`, under the room's next rev;
        the new Message.

        Raises ChangeRefused("not_found") for no such (or a deleted) message, ("forbidden") for another author.
        """
        return await self._change(room, id_, author, msg, now, False, list(mentions))

    async def delete_message(self, room: str, id_: int, author: str | None, *, any_author: bool = False) -> dict:
        """Erase a message (its author's, or anyone's with `any_author`), under the room's next rev.

        The text and its mentions are gone from storage when this returns; `{"room","id","rev"}`.
        ChangeRefused as for edits.
        """
        return await self._change(room, id_, author, None, 0.0, any_author, [])

    @abc.abstractmethod
    async def _change(
        self, room: str, id_: int, author: str | None, msg: str | None, now: float, any_author: bool, mentions: list[str]
    ) -> dict:
        """An edit (`msg`, its new `mentions`) or a delete (`msg` None) in one transaction with the
        room's next rev; either replaces the message's rows in the mentions index."""

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

    # -- moderation: owners, moderators, topics, mutes and bans, the audit log ----------
    #
    # Portable SQL, run by each backend's `_rows`. Accounts are lower-cased usernames;
    # a sanction's target is an owner key (`owner_key`): an account, or a guest session.

    @abc.abstractmethod
    async def _rows(self, sql: str, args: tuple) -> list[tuple]:
        """One statement (parameters marked `{}`), committed on its own; the rows it returns."""

    async def claim_room(self, room: str, account: str) -> None:
        """The first account that joins a public room owns it (a topic set earlier keeps no owner)."""
        await self._rows(
            "INSERT INTO room_info (room, owner, topic) VALUES ({}, {}, '') "
            "ON CONFLICT (room) DO UPDATE SET owner = excluded.owner WHERE room_info.owner IS NULL",
            (room, account),
        )

    async def room_info(self, room: str) -> tuple[str | None, str, set[str]]:
        """A room's owner (or None), its topic ('' if none) and its named moderators."""
        found = await self._rows("SELECT owner, topic FROM room_info WHERE room = {}", (room,))
        named = await self._rows("SELECT account FROM moderators WHERE room = {}", (room,))
        owner, topic = found[0] if found else (None, "")
        return owner, topic, {account for (account,) in named}

    async def set_moderator(self, room: str, account: str, on: bool) -> None:
        if on:
            sql = "INSERT INTO moderators (room, account) VALUES ({}, {}) ON CONFLICT DO NOTHING"
        else:
            sql = "DELETE FROM moderators WHERE room = {} AND account = {}"
        await self._rows(sql, (room, account))

    async def set_topic(self, room: str, topic: str) -> None:
        await self._rows(
            "INSERT INTO room_info (room, owner, topic) VALUES ({}, NULL, {}) "
            "ON CONFLICT (room) DO UPDATE SET topic = excluded.topic",
            (room, topic),
        )

    async def sanction(self, room: str, target: str) -> tuple[float, bool]:
        """Until when the target is muted in the room (0: never), and whether it is banned."""
        found = await self._rows("SELECT muted_until, banned FROM sanctions WHERE room = {} AND target = {}", (room, target))
        return (float(found[0][0]), bool(found[0][1])) if found else (0.0, False)

    async def set_mute(self, room: str, target: str, until: float) -> None:
        await self._rows(
            "INSERT INTO sanctions (room, target, muted_until, banned) VALUES ({}, {}, {}, 0) "
            "ON CONFLICT (room, target) DO UPDATE SET muted_until = excluded.muted_until",
            (room, target, float(until)),
        )

    async def set_ban(self, room: str, target: str, on: bool) -> None:
        await self._rows(
            "INSERT INTO sanctions (room, target, muted_until, banned) VALUES ({}, {}, 0, {}) "
            "ON CONFLICT (room, target) DO UPDATE SET banned = excluded.banned",
            (room, target, int(on)),
        )

    async def owner_known(self, owner: str) -> bool:
        """Whether this owner key was ever seen (a guest session's member id that exists)."""
        return bool(await self._rows("SELECT 1 FROM room_owners WHERE owner = {}", (owner,)))

    async def record(
        self, actor: str, action: str, target: str | None, room: str, *, message_id: int | None = None,
        detail: str | None = None,
    ) -> None:
        """One line of the audit log (never a message's text)."""
        await self._rows(
            "INSERT INTO audit (ts, actor, action, target, room, message_id, detail) VALUES ({}, {}, {}, {}, {}, {}, {})",
            (time.time(), actor, action, target, room, message_id, detail),
        )  # fmt: skip

    async def audit(self, room: str | None = None, limit: int = 50) -> list[dict]:
        sql, args = audit_query(room, limit)
        return [audit_entry(row) for row in await self._rows(sql, args)]

    async def directory(self, caller: str, query: str, limit: int) -> list[dict]:
        """Public rooms by members, then name (`query`: a part of the name, of [a-z0-9-] only)."""
        args: tuple = (caller, f"%{query}%", limit) if query else (caller, limit)
        sql = DIRECTORY.replace("NAME_FILTER", "AND m.room LIKE {}" if query else "")
        rows = await self._rows(sql, args)
        return [
            {"room": room, "topic": topic or "", "members": members, "last_ts": last_ts}
            for room, members, topic, last_ts in rows
        ]

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
