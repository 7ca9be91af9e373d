"""`Storage` on SQLite: an aiosqlite connection, and a writer thread for messages (disk work never runs on the event loop).

One process owns a data dir (a lock file held while the storage is open), so
the revoked-session set and the rooms' mutes and bans can live in memory too:
`is_revoked` (every handshake) and `sanction` (every message sent) never leave the loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

import aiosqlite

from . import (
    CLIENT_ID_SECONDS,
    COUNT_CAP,
    DEFAULT_ROOM,
    HISTORY_COLUMNS,
    MAX_ID,
    MAX_ROOMS,
    PRIMARY_KEYS,
    TABLES,
    Account,
    ChangeRefused,
    Storage,
    StorageError,
    TooManyRooms,
    deletion,
    mention_rows,
    mentions_json,
    message_dict,
    room_state,
    stored_mentions,
)
from .group_commit import GroupCommit

LOCK_FILE_NAME = "chatd.lock"

# Each entry migrates the schema from version N to N+1 (PRAGMA user_version), one
# statement per string. Version 1 was chatd's first schema (one global id sequence).
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE messages (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            room    TEXT NOT NULL,
            name    TEXT NOT NULL,
            account TEXT,
            msg     TEXT NOT NULL,
            ts      REAL NOT NULL
        )""",
        "CREATE INDEX messages_room_id ON messages (room, id)",
        """CREATE TABLE accounts (
            username      TEXT NOT NULL,
            username_key  TEXT NOT NULL PRIMARY KEY,
            password_hash TEXT NOT NULL,
            created       REAL NOT NULL
        )""",
        "CREATE TABLE revoked_sessions (sid TEXT PRIMARY KEY, until INTEGER NOT NULL)",
        "CREATE INDEX revoked_sessions_until ON revoked_sessions (until)",
    ],
    # 2: per-room gapless ids from a counter; messages keyed (room, id). Old ids keep
    # their gaps; each room's counter starts at its highest id.
    [
        """CREATE TABLE messages_by_room (
            room    TEXT NOT NULL,
            id      INTEGER NOT NULL,
            name    TEXT NOT NULL,
            account TEXT,
            msg     TEXT NOT NULL,
            ts      REAL NOT NULL,
            PRIMARY KEY (room, id)
        ) WITHOUT ROWID""",
        "INSERT INTO messages_by_room SELECT room, id, name, account, msg, ts FROM messages",
        "DROP TABLE messages",
        "ALTER TABLE messages_by_room RENAME TO messages",
        "CREATE TABLE room_counters (room TEXT PRIMARY KEY, last_id INTEGER NOT NULL) WITHOUT ROWID",
        "INSERT INTO room_counters SELECT room, max(id) FROM messages GROUP BY room",
    ],
    # 3: revisions, edits, deletions (tombstones) and client_ids. Old messages take
    # their id as rev (one change each, in id order); an account's may be edited by it
    # (author: its owner key, storage.owner_key).
    [
        "ALTER TABLE messages ADD COLUMN rev INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN edited REAL",
        "ALTER TABLE messages ADD COLUMN author TEXT",
        "ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
        "UPDATE messages SET rev = id, author = CASE WHEN account IS NULL THEN NULL ELSE 'a:' || lower(account) END",
        "CREATE UNIQUE INDEX messages_room_rev ON messages (room, rev)",
        "ALTER TABLE room_counters ADD COLUMN last_rev INTEGER NOT NULL DEFAULT 0",
        "UPDATE room_counters SET last_rev = last_id",
        """CREATE TABLE client_ids (
            author    TEXT NOT NULL,
            room      TEXT NOT NULL,
            client_id TEXT NOT NULL,
            id        INTEGER NOT NULL,
            rev       INTEGER NOT NULL,
            created   REAL NOT NULL,
            PRIMARY KEY (author, room, client_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX client_ids_created ON client_ids (created)",
    ],
    # 4: rooms that follow the person, read markers, mentions (issue 20). A message's
    # `mentions` is a JSON list of usernames (NULL: none); `author` (3) is the owner key.
    [
        "ALTER TABLE messages ADD COLUMN mentions TEXT",
        "CREATE TABLE room_owners (owner TEXT PRIMARY KEY) WITHOUT ROWID",
        """CREATE TABLE memberships (
            owner   TEXT NOT NULL,
            room    TEXT NOT NULL,
            read_id INTEGER NOT NULL,
            PRIMARY KEY (owner, room)
        ) WITHOUT ROWID""",
        """CREATE TABLE mentions (
            account TEXT NOT NULL,
            room    TEXT NOT NULL,
            id      INTEGER NOT NULL,
            PRIMARY KEY (account, room, id)
        ) WITHOUT ROWID""",
    ],
    # 5: moderation (issue 22): owners and topics, moderators, mutes and bans, the audit
    # log; memberships by room for the directory.
    [
        "CREATE TABLE room_info (room TEXT PRIMARY KEY, owner TEXT, topic TEXT NOT NULL) WITHOUT ROWID",
        "CREATE TABLE moderators (room TEXT NOT NULL, account TEXT NOT NULL, PRIMARY KEY (room, account)) WITHOUT ROWID",
        """CREATE TABLE sanctions (
            room        TEXT NOT NULL,
            target      TEXT NOT NULL,
            muted_until REAL NOT NULL,
            banned      INTEGER NOT NULL,
            PRIMARY KEY (room, target)
        ) WITHOUT ROWID""",
        "CREATE INDEX sanctions_target ON sanctions (target, room)",
        """CREATE TABLE audit (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            ts         REAL NOT NULL,
            actor      TEXT NOT NULL,
            action     TEXT NOT NULL,
            target     TEXT,
            room       TEXT NOT NULL,
            message_id INTEGER,
            detail     TEXT
        )""",
        "CREATE INDEX audit_room ON audit (room, seq)",
        "CREATE INDEX memberships_room ON memberships (room)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class _DataDirOwner:
    """This process's hold on a data dir: the locked file, and what is kept in memory for it."""

    fd: int
    users: int = 0
    revoked: dict[str, int] | None = None  # sid -> until
    sanctions: dict[tuple[str, str], tuple[float, bool]] | None = None  # (room, target) -> (muted until, banned)
    opening: asyncio.Lock = field(default_factory=asyncio.Lock)  # one opener at a time


# One lock per data dir and process: storages opened twice in one process (tests do)
# share it; another process is refused.
_owners: dict[Path, _DataDirOwner] = {}


def _lock_data_dir(directory: Path) -> _DataDirOwner:
    key = directory.resolve()
    owner = _owners.get(key)
    if owner is None:
        fd = os.open(key / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StorageError(
                f"data dir {directory} is in use by another chatd process (pid {holder}); "
                "one data dir serves one process (use --database-url for several)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        owner = _owners[key] = _DataDirOwner(fd)
    owner.users += 1
    return owner


def _unlock_data_dir(directory: Path) -> None:
    key = directory.resolve()
    owner = _owners[key]
    owner.users -= 1
    if owner.users == 0:
        del _owners[key]
        os.close(owner.fd)  # closing the only descriptor releases the flock


def _message(row: sqlite3.Row | tuple) -> dict:
    return message_dict(*row[:9])


def _history_change(row: sqlite3.Row | tuple) -> dict:
    """A row of `history` `since`: a Message, or a deletion."""
    return deletion(row[0], row[1], row[6]) if row[9] else message_dict(*row[:9])


# Both connections (the writer thread's and aiosqlite's) set these.
CONNECTION_PRAGMAS = (
    "PRAGMA busy_timeout=5000",
    "PRAGMA synchronous=FULL",  # a commit is on disk before its change is acked
    "PRAGMA secure_delete=ON",  # an erased message's bytes are overwritten, not left in free pages
)


# Every room of an owner (or one) with its RoomState: the unread and mention counts are
# index range scans over (room, id) and (account, room, id) after the marker, each
# stopped at COUNT_CAP rows; deleted messages do not count. ?1 owner, ?2 the account
# key for mentions (NULL for guests). A deletion erases its mention rows.
ROOM_STATES = f"""
SELECT m.room, m.read_id, coalesce(c.last_id, 0),
    (SELECT count(*) FROM (SELECT 1 FROM messages x
        WHERE x.room = m.room AND x.id > m.read_id AND x.author IS NOT ?1 AND NOT x.deleted LIMIT {COUNT_CAP})),
    (SELECT count(*) FROM (SELECT 1 FROM mentions y
        WHERE y.account = ?2 AND y.room = m.room AND y.id > m.read_id LIMIT {COUNT_CAP}))
FROM memberships m LEFT JOIN room_counters c ON c.room = m.room
WHERE m.owner = ?1 AND (?3 IS NULL OR m.room = ?3)
ORDER BY m.room
"""


# Marked read up to the room's last message: joining is not missing anything.
ADD_MEMBERSHIP = (
    "INSERT INTO memberships (owner, room, read_id) "
    "VALUES (?1, ?2, coalesce((SELECT last_id FROM room_counters WHERE room = ?2), 0))"
)


def _mention_key(owner: str) -> str | None:
    return owner[2:] if owner.startswith("a:") else None


class _MessageWriter:
    """Messages are written by one thread of their own, on a connection of their own;
    the rooms each handshake reads are read there too (owners seen for the first time
    are written: put in general).

    A batch is one trip to that thread (BEGIN, counters, rows, COMMIT), where
    aiosqlite would take one trip per statement and per fetch; on a busy core
    each trip costs a context switch, and a message is not broadcast before its
    commit. The other connection never sees a batch's rows before they commit.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatd-sqlite-writer")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._run(self._open)

    async def insert(self, messages: list[dict]) -> list[dict]:
        return await self._run(self._insert, messages)

    async def handshake_states(self, owners: list[str]) -> list[list[dict]]:
        return await self._run(self._handshake_states, owners)

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._thread.shutdown(wait=False)

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from None

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None)
        for pragma in CONNECTION_PRAGMAS:
            conn.execute(pragma)
        self._conn = conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def change(self, *args) -> dict:
        return await self._run(self._change, *args)

    def _handshake_states(self, owners: list[str]) -> list[list[dict]]:
        """Each owner's rooms; an owner in none is seeded first (one transaction for all of
        them), which puts an owner seen for the first time in general."""
        conn = self._conn
        if conn is None:
            raise StorageError("storage is not open")

        def states(owner: str) -> list[dict]:
            return [room_state(row) for row in conn.execute(ROOM_STATES, (owner, _mention_key(owner), None))]

        found = [states(owner) for owner in owners]
        unseeded = [owner for owner, rooms in zip(owners, found) if not rooms]
        if not unseeded:
            return found
        conn.execute("BEGIN IMMEDIATE")
        try:
            for owner in unseeded:
                if conn.execute("INSERT OR IGNORE INTO room_owners (owner) VALUES (?)", (owner,)).rowcount:
                    conn.execute(ADD_MEMBERSHIP, (owner, DEFAULT_ROOM))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return [rooms or states(owner) for owner, rooms in zip(owners, found)]

    def _insert(self, messages: list[dict]) -> list[dict]:
        conn = self._conn
        if conn is None:
            raise StorageError("storage is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Repeats of a kept client_id store nothing. The write lock is held and one
            # process owns the file, so looking first is safe; the primary key guards anyway.
            cutoff = time.time() - CLIENT_ID_SECONDS
            firsts: dict[tuple, int] = {}  # key -> position of its first send in this batch
            repeats: dict[int, dict | int] = {}  # position -> the first send's answer, or its position
            for pos, message in enumerate(messages):
                key = _client_key(message)
                if key is None:
                    continue
                if key in firsts:
                    repeats[pos] = firsts[key]
                    continue
                row = conn.execute(
                    "SELECT id, rev FROM client_ids WHERE author = ? AND room = ? AND client_id = ? AND created >= ?",
                    (*key, cutoff),
                ).fetchone()
                if row is None:
                    firsts[key] = pos
                else:
                    repeats[pos] = {"room": message["room"], "id": row[0], "rev": row[1], "duplicate": True}
            counts: dict[str, int] = {}
            for pos, message in enumerate(messages):
                if pos not in repeats:
                    counts[message["room"]] = counts.get(message["room"], 0) + 1
            next_id: dict[str, int] = {}
            next_rev: dict[str, int] = {}
            for room, count in counts.items():
                last_id, last_rev = conn.execute(
                    "INSERT INTO room_counters (room, last_id, last_rev) VALUES (?, ?, ?) "
                    "ON CONFLICT (room) DO UPDATE SET last_id = last_id + excluded.last_id, "
                    "last_rev = last_rev + excluded.last_rev RETURNING last_id, last_rev",
                    (room, count, count),
                ).fetchone()
                if not isinstance(last_id, int) or last_id > MAX_ID or not isinstance(last_rev, int):
                    raise StorageError(f"room {room!r} has used up its message ids")  # an overflow is a float
                next_id[room], next_rev[room] = last_id - count + 1, last_rev - count + 1
            answers: list = []
            rows = []
            mentioned: list[tuple[str, str, int]] = []  # rows of the mentions index
            for pos, message in enumerate(messages):
                if pos in repeats:
                    answers.append(None)
                    continue
                room = message["room"]
                id_, rev = next_id[room], next_rev[room]
                next_id[room], next_rev[room] = id_ + 1, rev + 1
                name, account, msg, ts = message["name"], message["account"], message["msg"], message["ts"]
                answers.append(message_dict(room, id_, name, account, msg, ts, rev, None, message.get("mentions")))
                mentions = message.get("mentions") or []
                rows.append((room, id_, name, account, msg, ts, rev, message["author"], mentions_json(mentions)))
                mentioned += mention_rows(room, id_, message["author"], mentions)
            conn.executemany(
                "INSERT INTO messages (room, id, name, account, msg, ts, rev, author, mentions) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # Sending moves the sender's read marker to the message (never back).
            conn.executemany(
                "UPDATE memberships SET read_id = max(read_id, ?) WHERE owner = ? AND room = ?",
                [(r[1], r[7], r[0]) for r in rows if r[7] is not None],
            )
            conn.executemany("INSERT OR IGNORE INTO mentions (account, room, id) VALUES (?, ?, ?)", mentioned)
            if firsts:  # an expired key of the same name is replaced
                conn.executemany(
                    "INSERT OR REPLACE INTO client_ids (author, room, client_id, id, rev, created) VALUES (?, ?, ?, ?, ?, ?)",
                    [(*key, answers[pos]["id"], answers[pos]["rev"], answers[pos]["ts"]) for key, pos in firsts.items()],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for pos, first in repeats.items():
            answers[pos] = first if isinstance(first, dict) else _duplicate(answers[first])
        return answers

    def _change(
        self, room: str, id_: int, author: str | None, msg: str | None, now: float, any_author: bool, mentions: list[str]
    ) -> dict:
        """An edit (`msg`, `mentions`) or a delete (`msg` None) in one transaction with the room's next rev."""
        conn = self._conn
        if conn is None:
            raise StorageError("storage is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT author, deleted, mentions FROM messages WHERE room = ? AND id = ?", (room, id_)
            ).fetchone()
            if row is None or row[1]:
                raise ChangeRefused("not_found")
            if not any_author and (author is None or row[0] != author):
                raise ChangeRefused("forbidden")
            (rev,) = conn.execute(
                "UPDATE room_counters SET last_rev = last_rev + 1 WHERE room = ? RETURNING last_rev", (room,)
            ).fetchone()
            # The old mentions go from the index (an edit recomputes them, a delete erases them).
            conn.executemany(
                "DELETE FROM mentions WHERE account = ? AND room = ? AND id = ?",
                mention_rows(room, id_, row[0], stored_mentions(row[2])),
            )
            if msg is None:
                # The tombstone keeps only what `since` reports: no name, no text, no author, no mentions.
                conn.execute(
                    "UPDATE messages SET name = '', account = NULL, msg = '', edited = NULL, author = NULL, "
                    "mentions = NULL, deleted = 1, rev = ? WHERE room = ? AND id = ?",
                    (rev, room, id_),
                )
                answer = {"room": room, "id": id_, "rev": rev}
            else:
                answer = _message(
                    conn.execute(
                        "UPDATE messages SET msg = ?, edited = ?, rev = ?, mentions = ? WHERE room = ? AND id = ? "
                        f"RETURNING {HISTORY_COLUMNS}",
                        (msg, now, rev, mentions_json(mentions), room, id_),
                    ).fetchone()
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO mentions (account, room, id) VALUES (?, ?, ?)",
                    mention_rows(room, id_, row[0], mentions),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if msg is None:
            # Old versions of the page live on in the WAL until it is written back and cut:
            # truncate it now (secure_delete has already zeroed the freed bytes in the file).
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return answer


def _client_key(message: dict) -> tuple[str, str, str] | None:
    if message.get("client_id") is None or message.get("author") is None:
        return None
    return (message["author"], message["room"], message["client_id"])


def _duplicate(first: dict) -> dict:
    return {"room": first["room"], "id": first["id"], "rev": first["rev"], "duplicate": True}


class SqliteStorage(Storage):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._owner: _DataDirOwner | None = None
        self._writer: _MessageWriter | None = None
        self._group_commit = GroupCommit(self._insert_batch)
        # The handshakes that arrive together read their rooms in one trip (group_commit.py).
        self._handshakes = GroupCommit(self._handshake_batch)
        # The aiosqlite connection is shared: a statement issued while one of its
        # transactions is open (copy-data's load, clear) would join it. Every use
        # takes turns. Message batches go through the writer's own connection.
        self._turn = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("storage is not open")
        return self._db

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._owner = _lock_data_dir(self.path.parent)
            # No other process can open this data dir; other openers in this one wait here
            # (switching to WAL while another connection is mid-open can fail as "locked").
            async with self._owner.opening:
                self._db = await self._connect()
                await self.db.execute("PRAGMA journal_mode=WAL")
                for pragma in CONNECTION_PRAGMAS:
                    await self.db.execute(pragma)
                await self._migrate()
                await self._load_in_memory()
                self._writer = _MessageWriter(self.path)
                await self._writer.open()
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StorageError(f"cannot open database {self.path}: {exc}") from None
        except BaseException:
            await self.close()
            raise

    async def _connect(self) -> aiosqlite.Connection:
        connection = aiosqlite.connect(self.path, isolation_level=None)
        try:
            return await connection
        except BaseException:
            # aiosqlite stops its worker thread without waiting for it; wait here, or the
            # thread may report back to an event loop that start-up has already closed.
            thread = getattr(connection, "_thread", None)
            if thread is not None:
                await asyncio.to_thread(thread.join, 1.0)
            raise

    async def _migrate(self) -> None:
        # BEGIN IMMEDIATE takes the write lock before the version is read: two openers
        # cannot both decide to migrate.
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            async with self.db.execute("PRAGMA user_version") as cur:
                (version,) = await cur.fetchone()
            if version > SCHEMA_VERSION:
                raise StorageError(f"database {self.path} is from a newer chatd (schema {version})")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    await self.db.execute(statement)
            await self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def _load_in_memory(self) -> None:
        assert self._owner is not None
        if self._owner.revoked is None:
            self._owner.revoked = dict(await self.db.execute_fetchall("SELECT sid, until FROM revoked_sessions"))
        if self._owner.sanctions is None:
            self._owner.sanctions = {}
            self._keep_sanctions(await self.db.execute_fetchall(f"SELECT {', '.join(TABLES['sanctions'])} FROM sanctions"))

    @property
    def _revoked(self) -> dict[str, int]:
        if self._owner is None or self._owner.revoked is None:
            raise StorageError("storage is not open")
        return self._owner.revoked

    @property
    def _sanctions(self) -> dict[tuple[str, str], tuple[float, bool]]:
        if self._owner is None or self._owner.sanctions is None:
            raise StorageError("storage is not open")
        return self._owner.sanctions

    def _keep_sanctions(self, rows) -> None:
        """Rows of `sanctions` (TABLES' column order), as stored, into memory."""
        for room, target, muted_until, banned in rows:
            self._sanctions[room, target] = (float(muted_until), bool(banned))

    # -- mutes and bans: written through, read from memory ----------------------------

    async def sanction(self, room: str, target: str) -> tuple[float, bool]:
        return self._sanctions.get((room, target), (0.0, False))

    async def set_mute(self, room: str, target: str, until: float) -> None:
        await super().set_mute(room, target, until)
        self._sanctions[room, target] = (float(until), self._sanctions.get((room, target), (0.0, False))[1])

    async def set_ban(self, room: str, target: str, on: bool) -> None:
        await super().set_ban(room, target, on)
        self._sanctions[room, target] = (self._sanctions.get((room, target), (0.0, False))[0], bool(on))

    async def close(self) -> None:
        await self._group_commit.drain()
        await self._handshakes.drain()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.close()
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()
        if self._owner is not None:
            self._owner = None
            _unlock_data_dir(self.path.parent)

    async def ping(self) -> None:
        try:
            async with self.db.execute("SELECT 1") as cur:
                await cur.fetchone()
        except (sqlite3.Error, ValueError) as exc:
            raise StorageError(str(exc)) from None

    # -- messages --------------------------------------------------------------

    async def _change(self, *args) -> dict:
        if self._writer is None:
            raise StorageError("storage is not open")
        return await self._writer.change(*args)

    async def _insert_batch(self, messages: list[dict]) -> list[dict]:
        """One transaction for everything that arrived together, in one trip to the writer thread."""
        if self._writer is None:
            raise StorageError("storage is not open")
        return await self._writer.insert(messages)

    async def _history_rows(self, template: str, args: tuple, *, changes: bool) -> list[dict]:
        convert = _history_change if changes else _message
        async with self._turn, self.db.execute(template.format(*("?" * len(args))), args) as cur:
            return [convert(r) for r in await cur.fetchall()]

    async def revision(self, room: str) -> tuple[int, int]:
        async with self._turn, self.db.execute(
            "SELECT last_id, last_rev FROM room_counters WHERE room = ?", (room,)
        ) as cur:
            row = await cur.fetchone()
        return (row[0], row[1]) if row else (0, 0)

    async def prune_client_ids(self, before: float) -> int:
        async with self._turn:
            cur = await self.db.execute("DELETE FROM client_ids WHERE created < ?", (before,))
            return cur.rowcount

    # -- rooms of a person, read markers -------------------------------------------

    async def room_states(self, owner: str, room: str | None = None) -> list[dict]:
        if room is None:  # a handshake's: one trip to the writer thread with the others of its burst
            return await self._handshakes.submit(owner)
        async with self._turn:
            return await self._room_states(owner, room)

    async def _room_states(self, owner: str, room: str | None) -> list[dict]:
        """(The caller has the turn.) One trip to aiosqlite's thread, not one per statement and fetch."""
        rows = await self.db.execute_fetchall(ROOM_STATES, (owner, _mention_key(owner), room))
        return [room_state(row) for row in rows]

    async def _handshake_batch(self, owners: list[str]) -> list[list[dict]]:
        if self._writer is None:
            raise StorageError("storage is not open")
        return await self._writer.handshake_states(owners)

    async def _seed(self, owner: str) -> bool:
        """An owner seen for the first time is in general; True if it was new."""
        cur = await self.db.execute("INSERT OR IGNORE INTO room_owners (owner) VALUES (?)", (owner,))
        if cur.rowcount == 0:
            return False
        await self._add_membership(owner, DEFAULT_ROOM)
        return True

    async def _add_membership(self, owner: str, room: str) -> None:
        await self.db.execute(ADD_MEMBERSHIP, (owner, room))

    async def _write(self, fn, *args):
        """`fn` in one write transaction of the shared connection (the caller has the turn)."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            result = await fn(*args)
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        return result

    async def join_room(self, owner: str, room: str) -> bool:
        async def join() -> bool:
            await self._seed(owner)
            async with self.db.execute(
                "SELECT count(*), count(*) FILTER (WHERE room = ?) FROM memberships WHERE owner = ?", (room, owner)
            ) as cur:
                count, present = await cur.fetchone()
            if present:
                return False
            if count >= MAX_ROOMS:
                raise TooManyRooms()
            await self._add_membership(owner, room)
            return True

        async with self._turn:
            return await self._write(join)

    async def leave_room(self, owner: str, room: str) -> bool:
        async def leave() -> bool:
            await self._seed(owner)  # else a later handshake would put it back in general
            cur = await self.db.execute("DELETE FROM memberships WHERE owner = ? AND room = ?", (owner, room))
            return cur.rowcount > 0

        async with self._turn:
            return await self._write(leave)

    async def mark_read(self, owner: str, room: str, message_id: int) -> dict | None:
        async with self._turn:
            cur = await self.db.execute(
                "UPDATE memberships SET read_id = ?4 WHERE owner = ?2 AND room = ?3 AND read_id < ?4",
                (message_id, owner, room, await self._clamped(room, message_id)),
            )
            states = await self._room_states(owner, room)
        return (states[0], cur.rowcount > 0) if states else None

    async def _clamped(self, room: str, message_id: int) -> int:
        async with self.db.execute("SELECT last_id FROM room_counters WHERE room = ?", (room,)) as cur:
            row = await cur.fetchone()
        return min(message_id, row[0] if row else 0)

    async def usernames(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        marks = ", ".join("?" * len(keys))
        async with self._turn, self.db.execute(
            f"SELECT username_key, username FROM accounts WHERE username_key IN ({marks})", keys
        ) as cur:
            return dict(await cur.fetchall())

    async def _rows(self, sql: str, args: tuple) -> list[tuple]:
        async with self._turn, self.db.execute(sql.format(*("?" * len(args))), args) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    # -- accounts and sessions ----------------------------------------------------

    async def create_account(self, username: str, password_hash: str) -> bool:
        try:
            async with self._turn:
                await self.db.execute(
                    "INSERT INTO accounts (username, username_key, password_hash, created) VALUES (?, ?, ?, ?)",
                    (username, username.lower(), password_hash, time.time()),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    async def find_account(self, username: str) -> Account | None:
        async with self._turn, self.db.execute(
            "SELECT username, password_hash FROM accounts WHERE username_key = ?", (username.lower(),)
        ) as cur:
            row = await cur.fetchone()
        return Account(*row) if row else None

    async def revoke_session(self, sid: str, until: int) -> None:
        now = int(time.time())
        async with self._turn:
            await self.db.execute("INSERT OR REPLACE INTO revoked_sessions (sid, until) VALUES (?, ?)", (sid, until))
            # Prune as we go: an entry past its `until` guards a cookie that has expired anyway.
            await self.db.execute("DELETE FROM revoked_sessions WHERE until < ?", (now,))
        revoked = self._revoked
        revoked[sid] = until
        for old in [s for s, u in revoked.items() if u < now]:
            del revoked[old]

    async def is_revoked(self, sid: str) -> bool:
        return sid in self._revoked

    # -- bulk access ------------------------------------------------------------

    async def count(self, table: str) -> int:
        if table not in TABLES:
            raise ValueError(table)
        async with self._turn, self.db.execute(f"SELECT count(*) FROM {table}") as cur:
            (n,) = await cur.fetchone()
        return n

    async def dump(self, table: str, batch_size: int = 5000) -> AsyncIterator[list[tuple]]:
        columns = ", ".join(TABLES[table])
        async with self._turn, self.db.execute(f"SELECT {columns} FROM {table} ORDER BY {PRIMARY_KEYS[table]}") as cur:
            while rows := await cur.fetchmany(batch_size):
                yield [tuple(r) for r in rows]

    async def load(self, table: str, rows: list[tuple]) -> None:
        columns = TABLES[table]
        marks = ", ".join("?" * len(columns))
        async with self._turn:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        if table == "revoked_sessions":
            self._revoked.update(rows)
        elif table == "sanctions":
            self._keep_sanctions(rows)

    async def clear(self) -> None:
        async with self._turn:
            await self.db.execute("BEGIN IMMEDIATE")
            for table in TABLES:
                await self.db.execute(f"DELETE FROM {table}")
            await self.db.execute("COMMIT")
        self._revoked.clear()
        self._sanctions.clear()
