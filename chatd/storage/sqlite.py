"""`Storage` on SQLite: one aiosqlite connection (its own thread, so disk work never runs on the event loop)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiosqlite

from . import HISTORY_DEFAULT, Account, Storage, StorageError

# Each entry migrates the schema from version N to N+1 (PRAGMA user_version).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE messages (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        room    TEXT NOT NULL,
        name    TEXT NOT NULL,
        account TEXT,
        msg     TEXT NOT NULL,
        ts      REAL NOT NULL
    );
    CREATE INDEX messages_room_id ON messages (room, id);
    CREATE TABLE accounts (
        username      TEXT NOT NULL,
        username_key  TEXT NOT NULL PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created       REAL NOT NULL
    );
    CREATE TABLE revoked_sessions (
        sid   TEXT PRIMARY KEY,
        until INTEGER NOT NULL
    );
    CREATE INDEX revoked_sessions_until ON revoked_sessions (until);
    """,
]


def _message(row: sqlite3.Row | tuple) -> dict:
    id_, room, name, account, msg, ts = row
    return {"id": id_, "room": room, "name": name, "account": account, "msg": msg, "ts": ts}


class SqliteStorage(Storage):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("storage is not open")
        return self._db

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await self._connect()
            await self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we ack the message it holds.
            await self.db.execute("PRAGMA synchronous=FULL")
            await self.db.execute("PRAGMA busy_timeout=5000")
            await self._migrate()
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StorageError(f"cannot open database {self.path}: {exc}") from None

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
        async with self.db.execute("PRAGMA user_version") as cur:
            (version,) = await cur.fetchone()
        if version > len(MIGRATIONS):
            raise StorageError(f"database {self.path} is from a newer chatd (schema {version})")
        for number in range(version, len(MIGRATIONS)):
            await self.db.executescript(
                f"BEGIN; {MIGRATIONS[number]} PRAGMA user_version = {number + 1}; COMMIT;"
            )

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def ping(self) -> None:
        try:
            async with self.db.execute("SELECT 1") as cur:
                await cur.fetchone()
        except (sqlite3.Error, ValueError) as exc:
            raise StorageError(str(exc)) from None

    async def add_message(self, room: str, name: str, account: str | None, msg: str, ts: float) -> dict:
        async with self.db.execute(
            "INSERT INTO messages (room, name, account, msg, ts) VALUES (?, ?, ?, ?, ?)",
            (room, name, account, msg, ts),
        ) as cur:
            id_ = cur.lastrowid
        return {"id": id_, "room": room, "name": name, "account": account, "msg": msg, "ts": ts}

    async def history(
        self, room: str, *, before: int | None = None, after: int | None = None, limit: int = HISTORY_DEFAULT
    ) -> list[dict]:
        columns = "id, room, name, account, msg, ts"
        if after is not None:
            sql = f"SELECT {columns} FROM messages WHERE room = ? AND id > ? ORDER BY id ASC LIMIT ?"
            args: tuple = (room, after, limit)
        elif before is not None:
            sql = f"SELECT {columns} FROM messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?"
            args = (room, before, limit)
        else:
            sql = f"SELECT {columns} FROM messages WHERE room = ? ORDER BY id DESC LIMIT ?"
            args = (room, limit)
        async with self.db.execute(sql, args) as cur:
            rows = [_message(r) for r in await cur.fetchall()]
        if after is None:
            rows.reverse()
        return rows

    async def create_account(self, username: str, password_hash: str) -> bool:
        try:
            await self.db.execute(
                "INSERT INTO accounts (username, username_key, password_hash, created) VALUES (?, ?, ?, ?)",
                (username, username.lower(), password_hash, time.time()),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    async def find_account(self, username: str) -> Account | None:
        async with self.db.execute(
            "SELECT username, password_hash FROM accounts WHERE username_key = ?", (username.lower(),)
        ) as cur:
            row = await cur.fetchone()
        return Account(*row) if row else None

    async def revoke_session(self, sid: str, until: int) -> None:
        now = int(time.time())
        await self.db.execute("INSERT OR REPLACE INTO revoked_sessions (sid, until) VALUES (?, ?)", (sid, until))
        # Prune as we go: an entry past its `until` guards a cookie that has expired anyway.
        await self.db.execute("DELETE FROM revoked_sessions WHERE until < ?", (now,))

    async def is_revoked(self, sid: str) -> bool:
        async with self.db.execute("SELECT 1 FROM revoked_sessions WHERE sid = ?", (sid,)) as cur:
            return await cur.fetchone() is not None
