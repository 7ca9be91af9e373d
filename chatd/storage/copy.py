"""`python -m chatd copy-data --from A --to B`: every table from one storage to another.

A and B are each a data dir (SQLite) or a postgresql:// URL. Rows are copied as
they are: ids, order, room counters, account hashes and revoked sessions. The
target must be empty unless `force`, which empties it first. Stop chatd on both
sides first: a SQLite data dir in use is refused anyway (its lock).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from ..config import DATABASE_FILE_NAME
from . import TABLES, Storage, StorageError
from .postgres import PostgresStorage, safe_url
from .sqlite import SqliteStorage

Progress = Callable[[str, int, int], None]


def open_storage(place: str) -> Storage:
    if place.startswith(("postgresql://", "postgres://")):
        return PostgresStorage(place)
    return SqliteStorage(Path(place) / DATABASE_FILE_NAME)


def describe(place: str) -> str:
    return safe_url(place) if place.startswith(("postgresql://", "postgres://")) else place


class StderrProgress:
    """`messages 40000/100000 (40%)`: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 2.0) -> None:
        self.stream, self.every, self.last = stream, every, 0.0
        self.tty = stream.isatty()

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if not finished and now - self.last < (0.1 if self.tty else self.every):
            return
        self.last = now
        percent = f" ({100 * done // total}%)" if total else ""
        line = f"copy-data: {table} {done}/{total}{percent}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


async def copy_data(source: str, target: str, *, force: bool = False, progress: Progress | None = None) -> dict[str, int]:
    """Copy everything; the number of rows per table."""
    if source == target:
        raise StorageError("--from and --to are the same place")
    progress = progress or (lambda table, done, total: None)
    src, dst = open_storage(source), open_storage(target)
    await src.open()
    try:
        await dst.open()
        try:
            filled = [table for table in TABLES if await dst.count(table)]
            if filled and not force:
                raise StorageError(
                    f"{describe(target)} already holds data ({', '.join(filled)}); use --force to replace it"
                )
            if filled:
                await dst.clear()
            copied = {}
            for table in TABLES:
                total, done = await src.count(table), 0
                progress(table, 0, total)
                async for rows in src.dump(table):
                    await dst.load(table, rows)
                    done += len(rows)
                    progress(table, done, total)
                copied[table] = done
            return copied
        finally:
            await dst.close()
    finally:
        await src.close()
