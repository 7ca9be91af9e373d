"""`python -m chatd audit`: the moderation log, newest first, read beside a running chatd.

SQLite is opened read-only, without the data dir's lock (WAL lets a reader in while
chatd writes); PostgreSQL through one plain connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import asyncpg

from ..config import DATABASE_FILE_NAME
from . import StorageError, audit_entry, audit_query
from .postgres import UNAVAILABLE, safe_url


def read_sqlite(data_dir: Path, room: str | None, limit: int) -> list[dict]:
    path = data_dir / DATABASE_FILE_NAME
    if not path.is_file():
        raise StorageError(f"no chatd database in {data_dir}")
    sql, args = audit_query(room, limit)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            rows = conn.execute(sql.format(*("?" * len(args))), args).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {path}: {exc}") from None
    return [audit_entry(row) for row in rows]


async def read_postgres(url: str, room: str | None, limit: int) -> list[dict]:
    sql, args = audit_query(room, limit)
    try:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            rows = await conn.fetch(sql.format(*(f"${i}" for i in range(1, len(args) + 1))), *args)
        finally:
            await conn.close()
    except UNAVAILABLE as exc:
        raise StorageError(f"cannot read {safe_url(url)}: {type(exc).__name__}: {exc}") from None
    return [audit_entry(tuple(row)) for row in rows]


def line(entry: dict) -> str:
    """time, actor, action, target, room (and a deletion's message id, or the action's detail)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["ts"]))
    fields = [when, entry["actor"], entry["action"], entry["target"] or "-", entry["room"]]
    if entry["message_id"] is not None:
        fields.append(f"message {entry['message_id']}")
    if entry["detail"]:
        fields.append(entry["detail"])
    return "\t".join(fields)


def print_audit(url: str | None, data_dir: Path, room: str | None, limit: int) -> None:
    if url:
        entries = asyncio.run(read_postgres(url, room, limit))
    else:
        entries = read_sqlite(data_dir, room, limit)
    for entry in entries:
        print(line(entry))
