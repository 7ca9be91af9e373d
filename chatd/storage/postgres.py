"""`Storage` on PostgreSQL through asyncpg and its connection pool.

Several chatd processes may share one database: ids come from a per-room counter
row updated in the same statement that inserts the messages, so the row lock
orders writers of a room and nothing becomes visible out of id order. Revocations
are read from the database on every check, so a logout on one process counts on
all at once. `msg` is stored as UTF-8 `bytea`: PostgreSQL `text` cannot hold U+0000,
which chat messages may contain.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

import asyncpg
from yarl import URL

from . import CLIENT_ID_SECONDS, COUNT_CAP, DEFAULT_ROOM, HISTORY_COLUMNS, MAX_ROOMS, PRIMARY_KEYS, TABLES
from . import Account, ChangeRefused, Storage, StorageError, TooManyRooms
from . import deletion, mention_rows, mentions_json, message_dict, room_state, stored_mentions
from .group_commit import GroupCommit

CONNECT_SECONDS = 5.0
COMMAND_SECONDS = 10.0
POOL_SIZE = 10
MIGRATION_LOCK = 0x63686174_64  # pg_advisory_xact_lock key ("chatd"): one migrator at a time

# Each entry migrates the schema from version N to N+1 (table chatd_schema).
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE accounts (
            username_key  text PRIMARY KEY,
            username      text NOT NULL,
            password_hash text NOT NULL,
            created       double precision NOT NULL
        )""",
        "CREATE TABLE room_counters (room text PRIMARY KEY, last_id bigint NOT NULL)",
        """CREATE TABLE messages (
            room    text NOT NULL,
            id      bigint NOT NULL,
            name    text NOT NULL,
            account text,
            msg     bytea NOT NULL,
            ts      double precision NOT NULL,
            PRIMARY KEY (room, id)
        )""",
        "CREATE TABLE revoked_sessions (sid text PRIMARY KEY, until bigint NOT NULL)",
        "CREATE INDEX revoked_sessions_until ON revoked_sessions (until)",
    ],
    # 2: revisions, edits, deletions (tombstones) and client_ids. Old messages take
    # their id as rev (one change each, in id order); an account's may be edited by it
    # (author: its owner key, storage.owner_key).
    [
        "ALTER TABLE messages ADD COLUMN rev bigint NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN edited double precision",
        "ALTER TABLE messages ADD COLUMN author text",
        "ALTER TABLE messages ADD COLUMN deleted boolean NOT NULL DEFAULT false",
        "UPDATE messages SET rev = id, author = 'a:' || lower(account) WHERE true",
        "CREATE UNIQUE INDEX messages_room_rev ON messages (room, rev)",
        "ALTER TABLE room_counters ADD COLUMN last_rev bigint NOT NULL DEFAULT 0",
        "UPDATE room_counters SET last_rev = last_id",
        """CREATE TABLE client_ids (
            author    text NOT NULL,
            room      text NOT NULL,
            client_id text NOT NULL,
            id        bigint NOT NULL,
            rev       bigint NOT NULL,
            created   double precision NOT NULL,
            PRIMARY KEY (author, room, client_id)
        )""",
        "CREATE INDEX client_ids_created ON client_ids (created)",
    ],
    # 3: rooms that follow the person, read markers, mentions (issue 20). A message's
    # `mentions` is a JSON list of usernames (NULL: none); `author` (2) is the owner key.
    [
        "ALTER TABLE messages ADD COLUMN mentions text",
        "CREATE TABLE room_owners (owner text PRIMARY KEY)",
        """CREATE TABLE memberships (
            owner   text NOT NULL,
            room    text NOT NULL,
            read_id bigint NOT NULL,
            PRIMARY KEY (owner, room)
        )""",
        """CREATE TABLE mentions (
            account text NOT NULL,
            room    text NOT NULL,
            id      bigint NOT NULL,
            PRIMARY KEY (account, room, id)
        )""",
    ],
    # 4: moderation (issue 22): owners and topics, moderators, mutes and bans, the audit
    # log; memberships by room for the directory.
    [
        "CREATE TABLE room_info (room text PRIMARY KEY, owner text, topic text NOT NULL)",
        "CREATE TABLE moderators (room text NOT NULL, account text NOT NULL, PRIMARY KEY (room, account))",
        """CREATE TABLE sanctions (
            room        text NOT NULL,
            target      text NOT NULL,
            muted_until double precision NOT NULL,
            banned      integer NOT NULL,
            PRIMARY KEY (room, target)
        )""",
        "CREATE INDEX sanctions_target ON sanctions (target, room)",
        """CREATE TABLE audit (
            seq        bigserial PRIMARY KEY,
            ts         double precision NOT NULL,
            actor      text NOT NULL,
            action     text NOT NULL,
            target     text,
            room       text NOT NULL,
            message_id bigint,
            detail     text
        )""",
        "CREATE INDEX audit_room ON audit (room, seq)",
        "CREATE INDEX memberships_room ON memberships (room)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

# One statement, so one round trip and one commit for a whole batch: advance each
# room's counters (rooms in order, so two writers never deadlock) and insert the
# messages numbered from them. The answer is each room's new last id and rev.
INSERT_BATCH = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::float8[], $6::text[], $7::text[])
        WITH ORDINALITY AS b(room, name, account, msg, ts, author, mentions, pos)
), counts AS (
    SELECT room, count(*) AS n FROM batch GROUP BY room
), counters AS (
    INSERT INTO room_counters AS c (room, last_id, last_rev) SELECT room, n, n FROM counts ORDER BY room
    ON CONFLICT (room) DO UPDATE SET last_id = c.last_id + excluded.last_id, last_rev = c.last_rev + excluded.last_rev
    RETURNING room, last_id, last_rev
), numbered AS (
    SELECT b.*, row_number() OVER (PARTITION BY b.room ORDER BY b.pos) - n.n AS k, c.last_id, c.last_rev
    FROM batch b JOIN counters c USING (room) JOIN counts n USING (room)
), stored AS (
    INSERT INTO messages (room, id, name, account, msg, ts, rev, author, mentions)
    SELECT room, last_id + k, name, account, msg, ts, last_rev + k, author, mentions FROM numbered
    RETURNING room, id, author, mentions
), marked AS (  -- sending moves the sender's read marker to the message (never back)
    UPDATE memberships m SET read_id = GREATEST(m.read_id, s.id)
    FROM (SELECT author, room, max(id) AS id FROM stored WHERE author IS NOT NULL GROUP BY author, room) s
    WHERE m.owner = s.author AND m.room = s.room
), mentioned AS (  -- each account a message mentions, its author excepted
    INSERT INTO mentions (account, room, id)
    SELECT DISTINCT lower(j.name), s.room, s.id FROM stored s, json_array_elements_text(s.mentions::json) AS j(name)
    WHERE s.mentions IS NOT NULL AND 'a:' || lower(j.name) IS DISTINCT FROM s.author
)
SELECT room, last_id, last_rev FROM counters
"""

# A batch's client_ids claim their keys first (in order, so two batches never
# deadlock), under the primary key: a key another transaction holds waits for it,
# and a key kept for less than a day is not returned — its send is a repeat. An
# expired key is taken over. The claimed ones get their id and rev before commit.
CLAIM_CLIENT_IDS = """
INSERT INTO client_ids AS k (author, room, client_id, id, rev, created)
SELECT author, room, client_id, 0, 0, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS u(author, room, client_id)
ORDER BY author, room, client_id
ON CONFLICT (author, room, client_id) DO UPDATE SET created = excluded.created WHERE k.created < $5
RETURNING author, room, client_id
"""
FILL_CLIENT_IDS = """
UPDATE client_ids AS k SET id = u.id, rev = u.rev
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS u(author, room, client_id, id, rev)
WHERE (k.author, k.room, k.client_id) = (u.author, u.room, u.client_id)
"""

# What "the database is not there (now)" looks like to asyncpg.
UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parsed = URL(url)
    except ValueError:
        return "the database URL"
    return str(parsed.with_password(None)) if parsed.password else url


def _message(row) -> dict:
    return message_dict(
        row["room"], row["id"], row["name"], row["account"], bytes(row["msg"]).decode("utf-8"), row["ts"],
        row["rev"], row["edited"], row["mentions"],
    )  # fmt: skip


def _history_change(row) -> dict:
    """A row of `history` `since`: a Message, or a deletion."""
    return deletion(row["room"], row["id"], row["rev"]) if row["deleted"] else _message(row)


def _client_key(message: dict) -> tuple[str, str, str] | None:
    if message.get("client_id") is None or message.get("author") is None:
        return None
    return (message["author"], message["room"], message["client_id"])


# Every room of an owner (or one) with its RoomState: the unread and mention counts are
# index range scans over (room, id) and (account, room, id) after the marker, each
# stopped at COUNT_CAP rows; deleted messages do not count (and their mention rows are
# erased). $1 owner, $2 the account key for mentions (NULL for guests).
ROOM_STATES = f"""
SELECT m.room, m.read_id, coalesce(c.last_id, 0),
    (SELECT count(*) FROM (SELECT 1 FROM messages x
        WHERE x.room = m.room AND x.id > m.read_id AND x.author IS DISTINCT FROM $1 AND NOT x.deleted LIMIT {COUNT_CAP}) u),
    (SELECT count(*) FROM (SELECT 1 FROM mentions y
        WHERE y.account = $2 AND y.room = m.room AND y.id > m.read_id LIMIT {COUNT_CAP}) v)
FROM memberships m LEFT JOIN room_counters c ON c.room = m.room
WHERE m.owner = $1 AND ($3::text IS NULL OR m.room = $3)
ORDER BY m.room
"""


def _mention_key(owner: str) -> str | None:
    return owner[2:] if owner.startswith("a:") else None


class PostgresStorage(Storage):
    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._group_commit = GroupCommit(self._insert_batch)

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_SECONDS,
                command_timeout=COMMAND_SECONDS,
                max_inactive_connection_lifetime=60,
            )
            await self._migrate()
        except StorageError:
            await self.close()
            raise
        except (*UNAVAILABLE, ValueError) as exc:
            await self.close()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"cannot use database {safe_url(self.url)}: {reason}") from None

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS chatd_schema (version integer NOT NULL)")
            version = await conn.fetchval("SELECT version FROM chatd_schema")
            if version is None:
                version = 0
                await conn.execute("INSERT INTO chatd_schema (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StorageError(f"database {safe_url(self.url)} is from a newer chatd (schema {version})")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    await conn.execute(statement)
            await conn.execute("UPDATE chatd_schema SET version = $1", SCHEMA_VERSION)

    async def close(self) -> None:
        await self._group_commit.drain()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CONNECT_SECONDS)
            except (*UNAVAILABLE, asyncio.TimeoutError):
                pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; the database's absence becomes StorageError. A broken
        connection goes back to the pool, which opens a new one when next asked."""
        if self._pool is None:
            raise StorageError("storage is not open")
        try:
            async with self._pool.acquire(timeout=CONNECT_SECONDS) as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise StorageError(f"database unavailable: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1", timeout=CONNECT_SECONDS)

    # -- messages --------------------------------------------------------------

    async def _insert_batch(self, messages: list[dict]) -> list[dict]:
        firsts: dict[tuple, int] = {}  # key -> position of its first send in this batch
        for pos, message in enumerate(messages):
            key = _client_key(message)
            if key is not None:
                firsts.setdefault(key, pos)
        async with self._connection() as conn:
            for attempt in (1, 2):
                try:
                    if not firsts:  # the common case: one statement, one round trip
                        return self._numbered(messages, await conn.fetch(INSERT_BATCH, *self._columns(messages)))
                    async with conn.transaction():
                        return await self._insert_keyed(conn, messages, firsts)
                except asyncpg.DeadlockDetectedError:  # rooms and keys are locked in order; still, retry once
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def _insert_keyed(self, conn: asyncpg.Connection, messages: list[dict], firsts: dict[tuple, int]) -> list[dict]:
        """A batch with client_ids: claim the keys, store what is not a repeat, fill in the keys; one transaction."""
        now = time.time()
        keys = list(firsts)
        claimed = {
            (r["author"], r["room"], r["client_id"])
            for r in await conn.fetch(CLAIM_CLIENT_IDS, *map(list, zip(*keys)), now, now - CLIENT_ID_SECONDS)
        }
        fresh = [
            pos for pos, m in enumerate(messages)
            if (key := _client_key(m)) is None or (key in claimed and firsts[key] == pos)
        ]  # fmt: skip
        stored: dict[int, dict] = {}
        if fresh:
            rows = await conn.fetch(INSERT_BATCH, *self._columns([messages[p] for p in fresh]))
            stored = dict(zip(fresh, self._numbered([messages[p] for p in fresh], rows)))
        if claimed:
            filled = [(*key, stored[firsts[key]]["id"], stored[firsts[key]]["rev"]) for key in keys if key in claimed]
            await conn.execute(FILL_CLIENT_IDS, *map(list, zip(*filled)))
        # Every other key was committed by its first send (ours waited for it): its answer.
        earlier = {}
        others = [key for key in keys if key not in claimed]
        if others:
            for r in await conn.fetch(
                "SELECT author, room, client_id, id, rev FROM client_ids "
                "WHERE (author, room, client_id) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
                *map(list, zip(*others)),
            ):
                earlier[(r["author"], r["room"], r["client_id"])] = r
        answers = []
        for pos, message in enumerate(messages):
            if pos in stored:
                answers.append(stored[pos])
                continue
            key = _client_key(message)
            first = stored.get(firsts[key]) or earlier.get(key)
            if first is None:
                raise StorageError("a repeated client_id has no first send")
            answers.append({"room": message["room"], "id": first["id"], "rev": first["rev"], "duplicate": True})
        return answers

    @staticmethod
    def _columns(messages: list[dict]) -> tuple:
        return (
            [m["room"] for m in messages],
            [m["name"] for m in messages],
            [m["account"] for m in messages],
            [m["msg"].encode("utf-8") for m in messages],
            [m["ts"] for m in messages],
            [m["author"] for m in messages],
            [mentions_json(m.get("mentions")) for m in messages],
        )

    @staticmethod
    def _numbered(messages: list[dict], rows) -> list[dict]:
        """Each message as SPEC's Message, numbered from its room's new last id and rev."""
        counts: dict[str, int] = {}
        for message in messages:
            counts[message["room"]] = counts.get(message["room"], 0) + 1
        next_ = {row["room"]: [row["last_id"] - counts[row["room"]] + 1, row["last_rev"] - counts[row["room"]] + 1] for row in rows}
        stored = []
        for m in messages:
            id_, rev = next_[m["room"]]
            next_[m["room"]] = [id_ + 1, rev + 1]
            stored.append(
                message_dict(m["room"], id_, m["name"], m["account"], m["msg"], m["ts"], rev, None, m.get("mentions"))
            )
        return stored

    async def _change(
        self, room: str, id_: int, author: str | None, msg: str | None, now: float, any_author: bool, mentions: list[str]
    ) -> dict:
        """An edit (`msg`, `mentions`) or a delete (`msg` None) in one transaction with the room's next rev.

        The message row is locked first, then the counter: a batch of new messages
        locks only the counter, so no two writers wait on each other in a circle.
        """
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT author, deleted, mentions FROM messages WHERE room = $1 AND id = $2 FOR UPDATE", room, id_
            )
            if row is None or row["deleted"]:
                raise ChangeRefused("not_found")
            if not any_author and (author is None or row["author"] != author):
                raise ChangeRefused("forbidden")
            rev = await conn.fetchval(
                "UPDATE room_counters SET last_rev = last_rev + 1 WHERE room = $1 RETURNING last_rev", room
            )
            # The old mentions go from the index (an edit recomputes them, a delete erases them).
            old = mention_rows(room, id_, row["author"], stored_mentions(row["mentions"]))
            if old:
                await conn.executemany("DELETE FROM mentions WHERE account = $1 AND room = $2 AND id = $3", old)
            if msg is None:
                # The tombstone keeps only what `since` reports: no name, no text, no author, no mentions.
                await conn.execute(
                    "UPDATE messages SET name = '', account = NULL, msg = ''::bytea, edited = NULL, author = NULL, "
                    "mentions = NULL, deleted = true, rev = $3 WHERE room = $1 AND id = $2",
                    room, id_, rev,
                )  # fmt: skip
                return {"room": room, "id": id_, "rev": rev}
            new = mention_rows(room, id_, row["author"], mentions)
            if new:
                await conn.executemany("INSERT INTO mentions (account, room, id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", new)
            return _message(
                await conn.fetchrow(
                    "UPDATE messages SET msg = $3, edited = $4, rev = $5, mentions = $6 WHERE room = $1 AND id = $2 "
                    f"RETURNING {HISTORY_COLUMNS}",
                    room, id_, msg.encode("utf-8"), now, rev, mentions_json(mentions),
                )
            )  # fmt: skip

    async def _history_rows(self, template: str, args: tuple, *, changes: bool) -> list[dict]:
        convert = _history_change if changes else _message
        sql = template.format(*(f"${i}" for i in range(1, len(args) + 1)))
        async with self._connection() as conn:
            return [convert(r) for r in await conn.fetch(sql, *args)]

    async def revision(self, room: str) -> tuple[int, int]:
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT last_id, last_rev FROM room_counters WHERE room = $1", room)
        return (row["last_id"], row["last_rev"]) if row else (0, 0)

    async def prune_client_ids(self, before: float) -> int:
        async with self._connection() as conn:
            status = await conn.execute("DELETE FROM client_ids WHERE created < $1", before)
        return int(status.split()[-1])

    # -- rooms of a person, read markers -------------------------------------------

    async def room_states(self, owner: str, room: str | None = None) -> list[dict]:
        async with self._connection() as conn:
            states = await self._room_states(conn, owner, room)
            if not states and room is None:
                async with conn.transaction():
                    await self._seed(conn, owner)
                # Read again whoever seeded it: a handshake of the same new owner on another
                # connection may have, between our read and our seed (its second tab).
                states = await self._room_states(conn, owner, None)
        return states

    @staticmethod
    async def _room_states(conn: asyncpg.Connection, owner: str, room: str | None) -> list[dict]:
        return [room_state(tuple(row)) for row in await conn.fetch(ROOM_STATES, owner, _mention_key(owner), room)]

    @staticmethod
    async def _seed(conn: asyncpg.Connection, owner: str) -> None:
        """An owner seen for the first time is in general. Then holds the owner's row locked
        until the transaction ends: one change of its rooms at a time."""
        new = await conn.fetchval(
            "INSERT INTO room_owners (owner) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", owner
        )
        if new:
            await PostgresStorage._add_membership(conn, owner, DEFAULT_ROOM)
        else:
            await conn.execute("SELECT 1 FROM room_owners WHERE owner = $1 FOR UPDATE", owner)

    @staticmethod
    async def _add_membership(conn: asyncpg.Connection, owner: str, room: str) -> None:
        # Marked read up to the room's last message: joining is not missing anything.
        await conn.execute(
            "INSERT INTO memberships (owner, room, read_id) "
            "VALUES ($1, $2, coalesce((SELECT last_id FROM room_counters WHERE room = $2), 0))",
            owner, room,
        )  # fmt: skip

    async def join_room(self, owner: str, room: str) -> bool:
        async with self._connection() as conn, conn.transaction():
            await self._seed(conn, owner)
            count, present = await conn.fetchrow(
                "SELECT count(*), count(*) FILTER (WHERE room = $2) FROM memberships WHERE owner = $1", owner, room
            )
            if present:
                return False
            if count >= MAX_ROOMS:
                raise TooManyRooms()
            await self._add_membership(conn, owner, room)
            return True

    async def leave_room(self, owner: str, room: str) -> bool:
        async with self._connection() as conn, conn.transaction():
            await self._seed(conn, owner)  # else a later handshake would put it back in general
            status = await conn.execute("DELETE FROM memberships WHERE owner = $1 AND room = $2", owner, room)
        return status != "DELETE 0"

    async def mark_read(self, owner: str, room: str, message_id: int) -> dict | None:
        async with self._connection() as conn:
            status = await conn.execute(
                "WITH target AS (SELECT LEAST($1, coalesce((SELECT last_id FROM room_counters WHERE room = $3), 0)) AS id) "
                "UPDATE memberships SET read_id = target.id FROM target "
                "WHERE owner = $2 AND room = $3 AND read_id < target.id",
                message_id, owner, room,
            )  # fmt: skip
            states = await self._room_states(conn, owner, room)
        return (states[0], status != "UPDATE 0") if states else None

    async def usernames(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT username_key, username FROM accounts WHERE username_key = ANY($1)", keys)
        return {row["username_key"]: row["username"] for row in rows}

    async def _rows(self, sql: str, args: tuple) -> list[tuple]:
        marks = (f"${i}" for i in range(1, len(args) + 1))
        async with self._connection() as conn:
            return [tuple(row) for row in await conn.fetch(sql.format(*marks), *args)]

    # -- accounts and sessions ----------------------------------------------------

    async def create_account(self, username: str, password_hash: str) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(
                "INSERT INTO accounts (username, username_key, password_hash, created) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (username_key) DO NOTHING",
                username, username.lower(), password_hash, time.time(),
            )  # fmt: skip
        return status == "INSERT 0 1"

    async def find_account(self, username: str) -> Account | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT username, password_hash FROM accounts WHERE username_key = $1", username.lower()
            )
        return Account(row["username"], row["password_hash"]) if row else None

    async def revoke_session(self, sid: str, until: int) -> None:
        async with self._connection() as conn:
            # Prune as we go: an entry past its `until` guards a cookie that has expired anyway.
            await conn.execute(
                "WITH pruned AS (DELETE FROM revoked_sessions WHERE until < $3) "
                "INSERT INTO revoked_sessions (sid, until) SELECT $1, $2 WHERE $2 >= $3 "
                "ON CONFLICT (sid) DO UPDATE SET until = excluded.until",
                sid, until, int(time.time()),
            )  # fmt: skip

    async def is_revoked(self, sid: str) -> bool:
        async with self._connection() as conn:
            return await conn.fetchval("SELECT true FROM revoked_sessions WHERE sid = $1", sid) is not None

    # -- bulk access ------------------------------------------------------------

    async def count(self, table: str) -> int:
        if table not in TABLES:
            raise ValueError(table)
        async with self._connection() as conn:
            return await conn.fetchval(f"SELECT count(*) FROM {table}")

    async def dump(self, table: str, batch_size: int = 5000) -> AsyncIterator[list[tuple]]:
        columns = TABLES[table]
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await conn.cursor(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {PRIMARY_KEYS[table]}")
            while rows := await cursor.fetch(batch_size):
                if table == "messages":
                    yield [(*r[:4], bytes(r[4]).decode("utf-8"), *r[5:]) for r in rows]
                else:
                    yield [tuple(r) for r in rows]

    async def load(self, table: str, rows: list[tuple]) -> None:
        if table == "messages":  # SQLite's deleted is 0/1
            rows = [(*r[:4], r[4].encode("utf-8"), *r[5:9], bool(r[9]), *r[10:]) for r in rows]
        async with self._connection() as conn:
            await conn.copy_records_to_table(table, records=rows, columns=list(TABLES[table]))
            if table == "audit":  # copied with their numbers: the sequence continues after them
                await conn.execute("SELECT setval('audit_seq_seq', (SELECT max(seq) FROM audit))")

    async def clear(self) -> None:
        async with self._connection() as conn:
            await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
