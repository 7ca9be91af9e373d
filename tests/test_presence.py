"""Presence as a snapshot then changes (issue 10), over real sockets to a real chatd.

The big room is filled with cheap raw Engine.IO clients (one aiohttp websocket
each, no Socket.IO client), so that a thousand of them fit in one test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time

import aiohttp
import pytest
from cryptography.fernet import Fernet

from chatd.sessions import COOKIE_NAME
from chatd.presence import sort_key
from conftest import Visitor, apply_presence, by_name, connect_socket

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


# -- a cheap raw client ----------------------------------------------------------------


class RawMember:
    """One guest socket spoken by hand: its welcome, and (when `keep`) every presence frame."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: dict, keep: bool) -> None:
        self.ws, self.welcome, self.keep = ws, welcome, keep
        self.id = welcome["id"]
        self.base = welcome["online"]  # what `view` applies the kept events to
        self.frames: list[str] = []  # raw `presence` frames, when kept
        self.heard = 0  # presence frames received
        self.heard_changed = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, base_url: str, keep: bool = False) -> RawMember:
        async with http.get(base_url + "/api/session") as response:
            cookie = response.cookies[COOKIE_NAME].value
        ws = await http.ws_connect(
            base_url + "/socket.io/?EIO=4&transport=websocket", headers={"Cookie": f"{COOKIE_NAME}={cookie}"}
        )
        assert (await ws.receive_str()).startswith("0{")
        await ws.send_str("40")
        assert (await ws.receive_str()).startswith("40")  # the CONNECT answer, then `welcome`
        while not (frame := await ws.receive_str()).startswith('42["welcome"'):
            pass
        return cls(ws, json.loads(frame[2:])[1], keep)

    async def _read(self) -> None:
        async for frame in self.ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                break
            if frame.data == "2":
                await self.ws.send_str("3")
            elif frame.data.startswith('42["presence"'):
                self.heard += 1
                if self.keep:
                    self.frames.append(frame.data)
                self.heard_changed.set()

    def events(self) -> list[dict]:
        return [json.loads(frame[2:])[1] for frame in self.frames]

    def view(self) -> dict[str, dict]:
        """The welcome's snapshot with every presence event applied, as SPEC says."""
        online = {m["id"]: m for m in self.base}
        for event in self.events():
            apply_presence(online, event)
        return online

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


async def connect_many(http, base_url: str, count: int, concurrency: int = 50) -> list[RawMember]:
    members: list[RawMember] = []
    for start in range(0, count, concurrency):
        batch = min(concurrency, count - start)
        members += await asyncio.gather(*(RawMember.connect(http, base_url) for _ in range(batch)))
    return members


async def converges(observer: RawMember, truth: dict[str, dict], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (view := observer.view()) != truth:
        if time.monotonic() > deadline:
            missing, extra = truth.keys() - view.keys(), view.keys() - truth.keys()
            raise AssertionError(f"view differs from the truth: {len(missing)} missing, {len(extra)} extra")
        await asyncio.sleep(0.05)


def truth_of(*groups) -> dict[str, dict]:
    return {m.id: {"id": m.id, "name": m.welcome["name"], "account": None} for group in groups for m in group}


@pytest.fixture
async def raw_http():
    # No cookie jar: every GET gives a new guest session, read from its Set-Cookie.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        yield http


# -- a room of a thousand ----------------------------------------------------------------


async def test_a_room_of_1000_hears_each_change_as_a_small_frame_and_converges_after_bursts(base_url, raw_http):
    observer = await RawMember.connect(raw_http, base_url, keep=True)
    crowd = await connect_many(raw_http, base_url, 1000)
    try:
        await converges(observer, truth_of([observer], crowd))
        await asyncio.sleep(1.0)  # the last batch is out
        heard_before = {m.id: m.heard for m in crowd}
        observer.base = list(observer.view().values())
        observer.frames.clear()

        # One change: a frame of the same small size as in an empty room, heard by every socket within 1 s.
        started = time.monotonic()
        newcomer = await RawMember.connect(raw_http, base_url)
        while not all(m.heard > heard_before[m.id] for m in crowd):
            assert time.monotonic() - started < 1.0, "not every socket heard the change within 1 s"
            await asyncio.sleep(0.01)
        assert len(observer.frames) == 1
        frame = observer.frames[0]
        assert len(frame.encode()) < 1024, len(frame)
        joined = truth_of([newcomer])[newcomer.id]
        count = len(crowd) + 2  # the crowd, the observer and the newcomer
        # The newcomer's snapshot: only the first 500 in SPEC's order, and how many in all.
        first_500 = sorted(truth_of([observer, newcomer], crowd).values(), key=sort_key)[:500]
        assert newcomer.welcome["online"] == first_500 and newcomer.welcome["online_count"] == count
        assert json.loads(frame[2:]) == ["presence", {"room": "general", "joins": [joined], "leaves": [], "count": count}]
        crowd.append(newcomer)

        # Bursts: 200 join at once, 300 leave at once, then 500 drop their connections at once.
        crowd += await connect_many(raw_http, base_url, 200, concurrency=200)
        await converges(observer, truth_of([observer], crowd))
        leaving, crowd = crowd[:300], crowd[300:]
        await asyncio.gather(*(m.close() for m in leaving))
        await converges(observer, truth_of([observer], crowd))
        dropped, crowd = crowd[:500], crowd[500:]
        for member in dropped:
            member.reader.cancel()
            member.ws._response.connection.transport.abort()  # no close frame: the connection just goes
        await converges(observer, truth_of([observer], crowd), timeout=5.0)
        # Those 500 leaves took few events, not one list per leave.
        assert len(observer.frames) < 30, len(observer.frames)

        # Applying every event twice changes nothing (idempotent), and so does a leave nobody holds.
        twice = {m["id"]: m for m in observer.base}
        for event in observer.events():
            apply_presence(twice, event)
            apply_presence(twice, event)
        apply_presence(twice, {"joins": [], "leaves": [{"id": "nobody", "name": "x", "account": None}]})
        assert twice == truth_of([observer], crowd)
    finally:
        await asyncio.gather(*(m.close() for m in [observer, *crowd]), return_exceptions=True)


# -- the rules, with Socket.IO clients ---------------------------------------------------------


async def test_a_session_stays_while_one_of_its_tabs_is_open(visitors):
    observer_visitor, alice = await visitors(), await visitors()
    observer = await observer_visitor.socket()
    await observer.next("welcome")
    tab1, tab2 = await alice.socket(), await alice.socket(transport="polling")
    await tab1.next("welcome")
    await tab2.next("welcome")
    assert tab1.id == tab2.id and ID_RE.fullmatch(tab1.id)
    await observer.sees("general", [observer.me, tab1.me])
    await tab1.close()
    await asyncio.sleep(0.3)  # several windows of a small room
    assert observer.members() == by_name([observer.me, tab2.me])  # still one entry: tab 2 is open
    await tab2.close()
    await observer.sees("general", [observer.me], timeout=1.0)


async def test_the_joiner_snapshot_includes_itself_and_its_own_join_changes_nothing(visitors):
    first, second = await (await visitors()).socket(), await (await visitors()).socket()
    welcome = await second.next("welcome")
    assert second.me in welcome["online"]
    await second.sees("general", [first.me, second.me])
    events = second.drain("presence")
    assert events and all(set(e) == {"room", "joins", "leaves", "count"} for e in events)
    assert events[-1]["count"] == 2 and welcome["online_count"] in (1, 2)
    assert second.members() == by_name([first.me, second.me])  # its own join, applied again, is one entry


async def test_a_session_that_comes_and_goes_within_the_window_may_appear_in_neither_list(visitors, base_url):
    observer = await (await visitors()).socket()
    await observer.next("welcome")
    await asyncio.sleep(0.2)
    observer.drain("presence")
    passer = await (await visitors()).socket()
    await passer.next("welcome")
    await passer.close()
    await asyncio.sleep(0.3)
    # Whatever arrived (nothing, or a join then a leave), the list is right again.
    assert observer.members() == [observer.me]


# -- member ids -----------------------------------------------------------------------------


def cookie_without_member_id(secret_key: str, sid: str, name: str = "guest-0001") -> str:
    """A cookie as chatd issued them before member ids existed."""
    session = {"sid": sid, "name": name, "account": None, "exp": int(time.time()) + 3600}
    return Fernet(secret_key).encrypt(json.dumps({"created": int(time.time()), "session": session}).encode()).decode()


async def test_member_ids_are_per_session_url_safe_and_not_the_sid(visitors, secret_key):
    alice, bob = await visitors(), await visitors()
    a1, a2, b = await alice.socket(), await alice.socket(), await bob.socket()
    for socket in (a1, a2, b):
        await socket.next("welcome")
    assert a1.id == a2.id != b.id
    sid = json.loads(Fernet(secret_key).decrypt(alice.cookie.encode()))["session"]["sid"]
    assert ID_RE.fullmatch(a1.id) and a1.id != sid and a1.id not in sid and sid not in a1.id


async def test_cookies_from_before_member_ids_get_a_keyed_hash_the_same_on_every_process(start_chatd, secret_key):
    sid = secrets.token_urlsafe(24)
    cookie = cookie_without_member_id(secret_key, sid)
    one, two = await start_chatd(), await start_chatd()  # two processes' worth of apps, one key
    ids = []
    for url in (one, two, one):
        socket = await connect_socket(url, cookie=cookie)
        try:
            welcome = await socket.next("welcome")
        finally:
            await socket.close()
        ids.append(welcome["id"])
        assert welcome["online"] == [{"id": welcome["id"], "name": "guest-0001", "account": None}]
    assert ids[0] == ids[1] == ids[2] and ID_RE.fullmatch(ids[0]) and ids[0] != sid and ids[0] not in sid
    # Another session (another sid) gets another id; another key gives another id for the same sid.
    other = await connect_socket(one, cookie=cookie_without_member_id(secret_key, secrets.token_urlsafe(24)))
    try:
        assert (await other.next("welcome"))["id"] != ids[0]
    finally:
        await other.close()
    other_key = Fernet.generate_key().decode()
    elsewhere = await start_chatd(secret_keys=(other_key,))
    socket = await connect_socket(elsewhere, cookie=cookie_without_member_id(other_key, sid))
    try:
        assert (await socket.next("welcome"))["id"] != ids[0]
    finally:
        await socket.close()


# -- the manager's room index (chatd/sio/managers.py) -------------------------------------------

# python-socketio's `basic_disconnect` as chatd/sio/managers.py copied it (5.18). A change here
# means the copy must be checked again (and the pin in setup.cfg moved).
BASIC_DISCONNECT_SHA256 = "2933b50bc4b2ea7b4367a84e05c2e22c52fed98b00afc3b88d06d61ab9fb9aa1"


def test_the_copied_manager_internals_have_not_moved():
    import hashlib
    import inspect

    from socketio.base_manager import BaseManager

    source = inspect.getsource(BaseManager.basic_disconnect)
    assert hashlib.sha256(source.encode()).hexdigest() == BASIC_DISCONNECT_SHA256, source


@contextlib.asynccontextmanager
async def guests_in_process(aiohttp_server, make_config, count: int):
    """An in-process chatd (its client manager at hand) and `count` guests, each welcomed."""
    from chatd.web import REALTIME, create_app

    app = create_app(make_config())
    server = await aiohttp_server(app)
    url = str(server.make_url("/")).rstrip("/")
    visitors_, sockets = [], []
    try:
        for _ in range(count):
            visitor = Visitor(url)
            visitors_.append(visitor)
            socket = await visitor.socket()
            await socket.next("welcome")
            sockets.append(socket)
        yield app[REALTIME].sio.manager, sockets
    finally:
        for visitor in visitors_:
            await visitor.close()


async def test_disconnects_leave_no_trace_in_the_manager_and_rooms_are_indexed(aiohttp_server, make_config):
    async with guests_in_process(aiohttp_server, make_config, 6) as (manager, sockets):
        for socket in sockets:
            assert (await socket.call("join", {"room": "side"}))["ok"] is True
        full_scan = {
            sid: sorted(r for r, members in manager.rooms["/"].items() if r is not None and sid in members)
            for sid in manager.rooms["/"][None]
        }
        assert all(sorted(manager.get_rooms(sid, "/")) == rooms for sid, rooms in full_scan.items())
        # Its own, its session's, its person's (the same session: a guest), general, side.
        assert all(len(rooms) == 5 for rooms in full_scan.values())
        for socket in sockets[:4]:
            await socket.close()
        await asyncio.sleep(0.2)
        left = set(manager.rooms["/"][None])
        assert len(left) == 2
        for room, members in manager.rooms["/"].items():
            assert set(members) <= left, room
        assert {sid for _, sid in manager._rooms_of} == left


async def test_a_room_stays_ordered_here_until_its_last_socket_here_leaves(aiohttp_server, make_config):
    # Rooms._release: a room others are still in is kept without a step more; the last
    # socket's leaving, or disconnecting, ends its ordering on this process.
    from chatd.web import REALTIME, create_app

    app = create_app(make_config())
    server = await aiohttp_server(app)
    url = str(server.make_url("/")).rstrip("/")
    sequencer = app[REALTIME].rooms.sequencer
    visitors_ = [Visitor(url) for _ in range(3)]
    try:
        sockets = []
        for visitor in visitors_:
            socket = await visitor.socket()
            await socket.next("welcome")
            assert (await socket.call("join", {"room": "side"}))["ok"] is True
            sockets.append(socket)
        assert sequencer.tracks("side")
        await sockets[0].close()
        assert (await sockets[1].call("leave", {"room": "side"}))["ok"] is True
        await asyncio.sleep(0.2)
        assert sequencer.tracks("side"), "a socket is still in the room"
        await sockets[2].close()
        for _ in range(50):
            if not sequencer.tracks("side"):
                break
            await asyncio.sleep(0.02)
        assert not sequencer.tracks("side")
        assert sequencer.tracks("general"), "the second guest is still in general"
    finally:
        for visitor in visitors_:
            await visitor.close()


async def test_a_large_presence_batch_is_written_in_slices_with_the_loop_running_between(aiohttp_server, make_config):
    """Presence events go out `size` sockets per event-loop turn (chatd/sio/managers.py,
    `emit_in_slices`): other work runs between the slices, every socket of the room gets
    the event once, and a socket that has left the room by its slice does not."""
    from chatd.rooms import chat_room

    async with guests_in_process(aiohttp_server, make_config, 7) as (manager, sockets):
        await asyncio.sleep(0.3)  # their own presence batches are out
        room = chat_room("general")
        in_room = list(manager.get_participants("/", room))
        assert len(in_room) == 7
        leaver = in_room[-1][0]  # in the last slice
        turns = []

        def other_work(n: int = 0) -> None:  # a callback per turn, as the loop's other work
            turns.append(n)
            if n == 1:  # after the first slice went out: the last socket leaves the room
                manager.basic_leave_room(leaver, "/", room)
            if n < 10:
                asyncio.get_running_loop().call_soon(other_work, n + 1)

        asyncio.get_running_loop().call_soon(other_work)
        await manager.emit_in_slices("probe", {"n": 1}, "/", room, size=3)
        assert len(turns) >= 2, "the slices went out in one turn"
        left_socket = next(s for s in sockets if s.sio.get_sid("/") == leaver)
        for socket in sockets:
            if socket is left_socket:
                await socket.nothing("probe", wait=0.3)
            else:
                assert await socket.next("probe") == {"n": 1}
                await socket.nothing("probe", wait=0.05)


async def test_a_slice_written_at_once_keeps_its_place_behind_frames_the_turn_holds(aiohttp_server, make_config):
    """A slice's frames go to the transport at once (`DirectWebSocket.write_now`), except to a
    socket with frames of the same turn still waiting for the turn's end: there they go after
    them, so a socket hears a room's events in the order they were sent."""
    from chatd.rooms import chat_room

    async with guests_in_process(aiohttp_server, make_config, 3) as (manager, sockets):
        await asyncio.sleep(0.3)  # their own presence batches are out
        room = chat_room("general")
        await manager.emit("probe", {"n": 0}, namespace="/", room=room)  # quiet: written at once
        await asyncio.sleep(0)  # that turn flushed; the next is busy (Flusher.QUIET_SECONDS)...
        await manager.emit("probe", {"n": 1}, namespace="/", room=room)  # ...so this waits for its end
        await manager.emit_in_slices("probe", {"n": 2}, "/", room)  # one slice, in the same turn
        await manager.emit("probe", {"n": 3}, namespace="/", room=room)
        for socket in sockets:
            assert [(await socket.next("probe"))["n"] for _ in range(4)] == [0, 1, 2, 3]


async def test_a_slice_written_at_once_counts_as_a_busy_turn_for_the_next_ones(aiohttp_server, make_config):
    """Frames written at once by a slice count, for `Flusher`'s quiet rule, as a turn that
    wrote: the next turn's broadcast is gathered for the turn's end, not written at once."""
    from chatd.rooms import chat_room

    async with guests_in_process(aiohttp_server, make_config, 2) as (manager, sockets):
        room = chat_room("general")
        _, eio_sid = next(iter(manager.get_participants("/", room)))
        ws = manager.server.eio.direct_websocket(eio_sid)
        ws.flusher.QUIET_SECONDS = 0.5  # this server's only: a slow machine's pauses do not matter
        await asyncio.sleep(0.6)  # quiet
        await manager.emit_in_slices("probe", {"n": 0}, "/", room)
        await asyncio.sleep(0)  # the next turn
        await manager.emit("probe", {"n": 1}, namespace="/", room=room)
        assert ws._pending, "written at once, as if the server were quiet"  # held: waits for the turn's end
        for socket in sockets:
            assert [(await socket.next("probe"))["n"] for _ in range(2)] == [0, 1]


def test_a_snapshot_is_the_cached_list_cut_where_the_caller_goes():
    """The welcome's list is written as slices of presence's cached bytes with the caller's
    entry between them: wherever the caller sorts, the pieces read as the sorted list."""
    from chatd.presence.published import PublishedList

    def member(name: str, id_: str) -> dict:
        return {"id": id_, "name": name, "account": None if name.startswith("guest") else name}

    room = [member(name, f"id-{i}") for i, name in enumerate(["bob", "Åsa", "guest-7", "alice", "Carol", "dave"])]
    published = PublishedList(room)
    callers = [
        member("aaron", "first"),  # sorts first
        member("carl", "middle"),  # between
        member("zed", "last"),  # after everyone
        member("bob", "id-00"),  # same name, told apart by id
        room[3],  # already listed: the cached list as it is
    ]
    for caller in callers:
        expected = sorted({m["id"]: m for m in [*room, caller]}.values(), key=sort_key)
        for limit in (500, 7, 6, 5, 3, 1):  # a snapshot lists only the first `limit`, and counts them all
            snapshot = published.with_member(caller, limit=limit)
            assert json.loads(snapshot.text) == expected[:limit], (caller, limit)
            assert snapshot.count == len(expected)
            assert len(snapshot) == len(snapshot.text.encode())
    # An empty room: just the caller.
    assert json.loads(PublishedList().with_member(callers[0]).text) == [callers[0]]
    # The cache follows changes.
    published.add(member("erin", "id-9"))
    published.discard("id-0")
    names = [m["name"] for m in json.loads(published.with_member(callers[2]).text)]
    assert names == ["alice", "Carol", "dave", "erin", "guest-7", "zed", "Åsa"]  # by casefold: "å" > "z"


async def test_a_room_whose_batches_are_slow_to_go_out_gathers_for_less_time():
    """SPEC's 1 s is from a change to every socket. A room of thousands gathers its changes
    for up to 0.9 s, and its batch then takes time to be written (in slices, between other
    work): the next window is cut by how long the last batch took, so first change to last
    write stays within the deadline — but to no less than half the window, so a server too
    loaded to keep it is not loaded more (chatd/presence/batching.py)."""
    from chatd.presence.batching import DEADLINE, ChangeBatcher

    loop = asyncio.get_running_loop()
    takes = [0.8, 0.3, 0.3]  # how long each batch takes to go out
    written: list[tuple[set, float]] = []

    async def slow_flush(room: str, touched: dict) -> None:
        await asyncio.sleep(takes[len(written)])  # a batch to thousands of sockets under load
        written.append((set(touched), loop.time()))

    async def change(member_id: str) -> float:
        """From a change to its batch written."""
        start, count = loop.time(), len(written)
        batcher.touch("big", {"id": member_id})
        while len(written) == count:
            await asyncio.sleep(0.01)
        assert written[-1][0] == {member_id}
        return written[-1][1] - start

    batcher = ChangeBatcher(slow_flush, lambda room: DEADLINE)  # a large room: the longest window
    try:
        assert await change("a") >= DEADLINE + 0.8  # nothing known yet: the whole window, then the batch
        # The last batch took 0.8 s: the window would be 0.1 s, but is half of 0.9.
        assert DEADLINE / 2 + 0.3 - 0.02 <= await change("b") <= DEADLINE / 2 + 0.3 + 0.1
        # The last batch took 0.3 s: the window is 0.6 s, and change to write within the deadline.
        assert await change("c") <= DEADLINE + 0.05
    finally:
        await batcher.close()
