"""Presence shared by several chatd processes through Redis.

**Redis holds who is in each room.** A process *holds* a session in a room
while one of that session's sockets on the process is there; a session is in
the room while any process holds it. Per room, a hash of member id → the
Member's JSON and a hash of member id → how many processes hold it; per
process, the set of what it holds ("<member id> <room>"). A hold is taken and
given back by a Lua script that, in the same atomic step, counts the room's
change (`room:<room>:seq`) and PUBLISHes it on `chatd:presence` when the
session's presence changed: `[room, seq, "+" or "-", member JSON]`. So every
process hears every room's changes in one order, numbered without gaps.

**Each process computes its own sockets' events.** It mirrors each room it has
sockets in: the room's members (read once, with the room's number, when its
first socket there arrives, not per join) kept current by the change stream,
and its published state (what its own sockets hold). From there it is the
in-process design: the shared `ChangeBatcher` gathers the changes a room's
stream brings, `_settle` compares the mirror with the published state, and the
net change goes to this process's sockets of the room (rooms.py emits
presence with `ignore_queue`). A snapshot is the process's published state:
no Redis call per join, and nothing awaited between reading it and sending
it, so a joiner's snapshot plus the events after it are the truth, as on one
process. (The alternative — one process settles a change in Redis and emits
the event to every process — needs a Redis read per snapshot, and two
processes' emits can cross on their way, so a join could arrive after the
leave that followed it.)

**Missed changes.** A change whose number is not the next one, a stream
connection that was (re)subscribed, or a room whose number in Redis stays ahead
of the mirror across two heartbeats: the room is read again, and the difference
is settled like any change.

**Processes that die.** Each process refreshes `alive:<id>` (expiring after
ALIVE_SECONDS) every HEARTBEAT_SECONDS and lists itself in `processes`. Every
process looks at the others on each heartbeat; one whose key has expired has
its holds given back by a script (in batches, each atomic; any survivor may
run it, each hold is given back once) that announces the leaves, so within
ALIVE_SECONDS + HEARTBEAT_SECONDS + a batching window (< 10 s) every
surviving socket hears them. A process that finds its own key gone (it stalled
past the expiry, or Redis restarted empty) takes its holds again and reads its
rooms again. On shutdown a process gives its holds back at once.

Writes (taking and giving back holds) leave in order through one queue and go
to Redis in pipelines, so a socket's leave never overtakes its join; the
scripts are idempotent, so a batch is simply sent again after an error.

The scripts compute the keys of the rooms they touch, so the keys live on one
Redis server (or a Sentinel-managed one), not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from ..tasks import TaskOwner
from . import Member, Presence, Publish
from .published import PublishedList, Snapshot

log = logging.getLogger("chatd.presence")

CHANNEL = "chatd:presence"
PREFIX = "chatd:presence:"
HEARTBEAT_SECONDS = 2.0
ALIVE_SECONDS = 6.0  # a process silent this long is dead; survivors notice within one more heartbeat
KEEP_IDLE_SECONDS = 30.0  # a room's mirror outlives its last local socket this long (no re-read on every come-back)
EMPTY_ROOM_SECONDS = 86400  # an empty room's change counter is forgotten after a day
REAP_BATCH = 500  # holds of a dead process given back per script run (Redis runs one script at a time)
RETRY_SECONDS = 1.0
SUBSCRIBE_WAIT_SECONDS = 5.0
FIRST_READ_WAIT_SECONDS = 2.0

# Give back one hold of a process (already out of its set); announce the leave when it was the last.
_RELEASE = """
local function release(prefix, channel, ttl, member_id, room)
  local base = prefix .. 'room:' .. room .. ':'
  if redis.call('HINCRBY', base .. 'holders', member_id, -1) > 0 then return 0 end
  redis.call('HDEL', base .. 'holders', member_id)
  local member = redis.call('HGET', base .. 'members', member_id)
  if not member then return 0 end
  redis.call('HDEL', base .. 'members', member_id)
  local seq = redis.call('INCR', base .. 'seq')
  if redis.call('HLEN', base .. 'members') == 0 then redis.call('EXPIRE', base .. 'seq', ttl) end
  redis.call('PUBLISH', channel, cjson.encode({room, seq, '-', member}))
  return 1
end
"""

# KEYS: process's set, processes, holders, members, seq. ARGV: entry, process id, member id, member JSON, room, channel.
JOIN = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
if redis.call('HINCRBY', KEYS[3], ARGV[3], 1) > 1 then return 0 end
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
local seq = redis.call('INCR', KEYS[5])
redis.call('PERSIST', KEYS[5])
redis.call('PUBLISH', ARGV[6], cjson.encode({ARGV[5], seq, '+', ARGV[4]}))
return 1
"""

# KEYS: process's set. ARGV: entry, member id, room, prefix, channel, empty room ttl.
LEAVE = _RELEASE + """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
return release(ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[2], ARGV[3])
"""

# KEYS: processes, the process's alive key, its set. ARGV: process id, prefix, channel, ttl, batch.
# -1 when the process is alive after all; else how many holds were given back (0: done).
REAP = _RELEASE + """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local entries = redis.call('SPOP', KEYS[3], tonumber(ARGV[5]))
for _, entry in ipairs(entries) do
  local at = string.find(entry, ' ', 1, true)
  if at then release(ARGV[2], ARGV[3], tonumber(ARGV[4]), string.sub(entry, 1, at - 1), string.sub(entry, at + 1)) end
end
if redis.call('SCARD', KEYS[3]) == 0 then redis.call('SREM', KEYS[1], ARGV[1]) end
return #entries
"""

# KEYS: the process's alive key, processes. ARGV: process id, ttl ms. Whether the key was still there.
BEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return existed
"""

PROCESSES = PREFIX + "processes"


def _room_key(room: str, part: str) -> str:
    return f"{PREFIX}room:{room}:{part}"


def _alive_key(process_id: str) -> str:
    return PREFIX + "alive:" + process_id


def _holds_key(process_id: str) -> str:
    return PREFIX + "process:" + process_id


class _Room:
    """This process's view of one room."""

    def __init__(self) -> None:
        self.sockets: dict[str, set[str]] = {}  # member id -> this process's sockets of it in the room
        self.local: dict[str, Member] = {}  # member id -> Member, for the sessions in `sockets`
        self.current: dict[str, Member] = {}  # the room's members everywhere, as the stream says
        self.seq = 0  # the last change applied to `current`
        self.published = PublishedList()  # what this process's sockets of the room hold
        self.loading: asyncio.Future | None = None  # a read of the room under way
        self.told = False  # a snapshot of `published` has been given out (else a read may replace it)
        self.backlog: list[tuple[int, str, str]] = []  # changes heard while reading
        self.stale = False  # the last read failed: read again
        self.behind: int | None = None  # Redis's number at the last check, when ahead of ours
        self.idle_since: float | None = time.monotonic()  # since when no local socket is here


class RedisPresence(Presence):
    def __init__(self, publish: Publish, redis: Redis) -> None:
        super().__init__(publish)
        self._redis = redis
        self.process_id = secrets.token_hex(8)
        self._rooms: dict[str, _Room] = {}
        self._join = redis.register_script(JOIN)
        self._leave = redis.register_script(LEAVE)
        self._reap = redis.register_script(REAP)
        self._beat_script = redis.register_script(BEAT)
        self._outbox: list[tuple[str, str, Member]] = []  # ("join" | "leave", room, member), in order
        self._outbox_ready = asyncio.Event()
        self._writing = False
        self._tasks = TaskOwner("Redis presence")
        self._subscribed = asyncio.Event()
        self._beaten = False
        self._closing = False
        self._down = False

    # -- lifetime -------------------------------------------------------------

    async def start(self) -> None:
        """Hear the change stream and beat once before serving."""
        self._tasks.spawn(self._listen_forever())
        self._tasks.spawn(self._write_forever())
        try:
            await asyncio.wait_for(self._subscribed.wait(), SUBSCRIBE_WAIT_SECONDS)
            await self._beat()
        except BaseException as exc:
            await self._tasks.close()
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectionError("cannot subscribe to the presence channel") from None
            raise
        self._tasks.spawn(self._beat_forever())

    async def close(self) -> None:
        """Give this process's holds back at once, so the others announce its leaves now."""
        self._closing = True
        await super().close()
        try:
            await asyncio.wait_for(self._goodbye(), 3.0)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("could not give this process's presence back (%s); the others will in %d s", exc, ALIVE_SECONDS)
        await self._tasks.close()

    async def _goodbye(self) -> None:
        while self._outbox or self._writing:  # the leaves of the sockets just closed
            await asyncio.sleep(0.01)
        await self._redis.delete(_alive_key(self.process_id))
        await self._reap_process(self.process_id)

    # -- the store ----------------------------------------------------------

    async def snapshot(self, room: str, member: Member) -> Snapshot:
        state = self._rooms.get(room)
        if state is None:
            return PublishedList().with_member(member)
        state.told = True
        return state.published.with_member(member)

    async def _add(self, room: str, socket_id: str, member: Member) -> bool:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
            state.loading = self._tasks.spawn(self._read(room, state))
        # Recorded before any wait, so that a leave of this socket meanwhile finds it.
        state.idle_since = None
        sockets = state.sockets.get(member["id"])
        if sockets is None:
            state.sockets[member["id"]] = {socket_id}
            state.local[member["id"]] = member
            self._send("join", room, member)
        else:
            sockets.add(socket_id)
        if state.loading is not None and not state.told:
            # The room's first read: its snapshot comes from it. Bounded, so that a Redis that
            # does not answer delays a handshake but never stops it (the read's result then
            # reaches this socket as changes).
            try:
                await asyncio.wait_for(asyncio.shield(state.loading), FIRST_READ_WAIT_SECONDS)
            except asyncio.TimeoutError:
                pass
        return False  # the change reaches every process, this one too, through the stream

    async def _remove(self, room: str, socket_id: str, member: Member) -> bool:
        state = self._rooms.get(room)
        sockets = state.sockets.get(member["id"]) if state is not None else None
        if sockets is None or socket_id not in sockets:
            return False
        sockets.discard(socket_id)
        if not sockets:
            del state.sockets[member["id"]], state.local[member["id"]]
            self._send("leave", room, member)
            if not state.sockets:
                state.idle_since = time.monotonic()
        return False

    async def _settle(self, room: str, touched: dict[str, Member]) -> tuple[list[Member], list[Member]]:
        state = self._rooms.get(room)
        if state is None:
            return [], []
        return state.published.settle(touched, state.current.get)

    def _published_count(self, room: str) -> int:
        state = self._rooms.get(room)
        return len(state.published.members) if state is not None else 0

    def _size(self, room: str) -> int:
        state = self._rooms.get(room)
        return len(state.current) if state is not None else 0

    # -- writes: in order, pipelined -------------------------------------------

    def _send(self, kind: str, room: str, member: Member) -> None:
        self._outbox.append((kind, room, member))
        self._outbox_ready.set()

    async def _write_forever(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                self._writing = True
                try:
                    await self._write(batch)
                except Exception:
                    log.exception("could not write %d presence updates", len(batch))
                finally:
                    self._writing = False

    async def _write(self, batch: list[tuple[str, str, Member]]) -> None:
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for kind, room, member in batch:
                        await self._script_call(pipe, kind, room, member)
                    await pipe.execute()
                self._ok()
                return
            except ResponseError:
                log.exception("Redis refused a presence update; dropped %d of them", len(batch))
                return
            except (RedisError, OSError) as exc:
                self._failed(exc)
                if self._closing:
                    return
                await asyncio.sleep(RETRY_SECONDS)  # then the same batch again: the scripts are idempotent

    async def _script_call(self, pipe, kind: str, room: str, member: Member) -> None:
        entry = member["id"] + " " + room
        holds = _holds_key(self.process_id)
        if kind == "join":
            await self._join(
                keys=[holds, PROCESSES, _room_key(room, "holders"), _room_key(room, "members"), _room_key(room, "seq")],
                args=[entry, self.process_id, member["id"], orjson.dumps(member), room, CHANNEL],
                client=pipe,
            )
        else:
            await self._leave(
                keys=[holds], args=[entry, member["id"], room, PREFIX, CHANNEL, EMPTY_ROOM_SECONDS], client=pipe
            )

    # -- the change stream ---------------------------------------------------------

    async def _listen_forever(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        # (Re)subscribed: whatever was published meanwhile is lost to us.
                        self._subscribed.set()
                        for room in list(self._rooms):
                            self._reread(room)
                    elif message["type"] == "message":
                        try:
                            self._heard(message["data"])
                        except Exception:  # whoever can publish on Redis must not stop the stream
                            log.exception("dropped a presence change that could not be applied")
            except (RedisError, OSError) as exc:
                self._failed(exc)
            finally:
                await pubsub.aclose()
            await asyncio.sleep(RETRY_SECONDS)

    def _heard(self, data: bytes) -> None:
        room, seq, change, member_json = orjson.loads(data)
        state = self._rooms.get(room)
        if state is None:
            return  # no socket of ours there
        if state.loading is not None:
            state.backlog.append((seq, change, member_json))
        else:
            self._apply(room, state, seq, change, member_json)

    def _apply(self, room: str, state: _Room, seq: int, change: str, member_json: str) -> None:
        if seq <= state.seq:
            return  # in the mirror already
        if seq > state.seq + 1:
            self._reread(room)  # one was missed
            return
        member = orjson.loads(member_json)
        state.seq = seq
        if change == "+":
            state.current[member["id"]] = member
        else:
            state.current.pop(member["id"], None)
        self._batcher.touch(room, member)

    # -- reading a room ---------------------------------------------------------------

    def _reread(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is not None and state.loading is None:
            state.loading = self._tasks.spawn(self._read(room, state))

    async def _read(self, room: str, state: _Room) -> None:
        """Read the room's members and number together; then apply what the stream said meanwhile."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(_room_key(room, "seq"))
                pipe.hvals(_room_key(room, "members"))
                seq, values = await pipe.execute()
            members = [orjson.loads(value) for value in values]
        except Exception as exc:
            if isinstance(exc, (RedisError, OSError)):
                self._failed(exc)
            else:
                log.exception("could not read the presence of %r", room)
            state.stale = True  # read again at the next heartbeat
        else:
            self._ok()
            state.stale = False
            state.current = {member["id"]: member for member in members}
            state.seq = int(seq or 0)
            if not state.told:
                # No socket of this process has been told anything about the room yet.
                state.published = PublishedList(state.current.values())
            else:
                # The difference from what this process's sockets hold is settled like any change.
                published = state.published.members
                for member_id in state.current.keys() ^ published.keys():
                    self._batcher.touch(room, state.current.get(member_id) or published[member_id])
        state.loading = None
        backlog, state.backlog = state.backlog, []
        for seq_heard, change, member_json in backlog:
            if state.loading is None:
                self._apply(room, state, seq_heard, change, member_json)
            else:  # a gap in the backlog started another read
                state.backlog.append((seq_heard, change, member_json))

    # -- heartbeats ---------------------------------------------------------------------

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                self._failed(exc)
            except Exception:
                log.exception("presence heartbeat failed")

    async def _beat(self) -> None:
        existed = await self._beat_script(
            keys=[_alive_key(self.process_id), PROCESSES], args=[self.process_id, int(ALIVE_SECONDS * 1000)]
        )
        self._ok()
        if not existed and self._beaten:
            log.warning("this process's presence had expired in Redis; taking its sessions' places again")
            for room, state in self._rooms.items():
                for member in state.local.values():
                    self._send("join", room, member)
                self._reread(room)
        self._beaten = True
        await self._reap_dead()
        await self._check_mirrors()
        self._forget_idle()

    async def _reap_dead(self) -> None:
        others = [p.decode() for p in await self._redis.smembers(PROCESSES) if p.decode() != self.process_id]
        if not others:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for process_id in others:
                pipe.exists(_alive_key(process_id))
            alive = await pipe.execute()
        for process_id, is_alive in zip(others, alive):
            if not is_alive:
                given_back = await self._reap_process(process_id)
                if given_back:
                    log.warning("process %s stopped beating; gave back its %d presence holds", process_id, given_back)

    async def _reap_process(self, process_id: str) -> int:
        total = 0
        while True:
            count = await self._reap(
                keys=[PROCESSES, _alive_key(process_id), _holds_key(process_id)],
                args=[process_id, PREFIX, CHANNEL, EMPTY_ROOM_SECONDS, REAP_BATCH],
            )
            if count <= 0:
                return total
            total += count

    async def _check_mirrors(self) -> None:
        """Read again a room whose number in Redis stays ahead of ours (a change lost on the way)."""
        rooms = [room for room, state in self._rooms.items() if state.loading is None]
        if not rooms:
            return
        numbers = await self._redis.mget([_room_key(room, "seq") for room in rooms])
        for room, number in zip(rooms, numbers):
            state = self._rooms.get(room)
            if state is None or state.loading is not None:
                continue
            number = int(number or 0)
            if state.stale or number < state.seq or (state.behind is not None and state.seq < state.behind):
                state.behind = None
                self._reread(room)
            else:
                state.behind = number if number > state.seq else None

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for room, state in list(self._rooms.items()):
            if state.idle_since is not None and state.loading is None and now - state.idle_since > KEEP_IDLE_SECONDS:
                del self._rooms[room]

    # -- outages ---------------------------------------------------------------------

    def _failed(self, exc: Exception) -> None:
        if not self._down:
            self._down = True
            log.warning("Redis unreachable (%s); presence across processes waits for it", exc)

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.warning("Redis is back; presence is shared again")
