"""Shared test parts: a real chatd (in-process, served as `python -m chatd` serves it
or through `aiohttp_server`, or as a `python -m chatd` subprocess) and real clients (aiohttp for HTTP,
python-socketio's AsyncClient for sockets). Nothing here is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest
import socketio
from aiohttp import web
from cryptography.fernet import Fernet

from chatd.__main__ import SHUTDOWN_SECONDS
from chatd.accounts import CHEAP_HASHES_ENV
from chatd.config import Config
from chatd.sessions import COOKIE_NAME
from chatd.web import create_app
from pg_service import pg_database_url, pg_server  # noqa: F401 (fixtures)
from services import ROOT, ChatdProcess, free_port  # noqa: F401 (for the tests' imports)

EVENT_TIMEOUT = 3.0

# argon2's cheapest parameters for every chatd the suite starts, in-process or as a
# `python -m chatd` child (which inherits this environment): registrations, logins and
# the start-up warm-up then cost microseconds, not ~0.1 s of CPU each. Tests whose point
# is the cost of real hashing carry @pytest.mark.real_hashes (see chatd/accounts.py).
os.environ.setdefault(CHEAP_HASHES_ENV, "1")


@pytest.fixture(autouse=True)
def _real_hashes(request, monkeypatch):
    if request.node.get_closest_marker("real_hashes"):
        monkeypatch.delenv(CHEAP_HASHES_ENV, raising=False)


POSTGRES_FIXTURES = {"pg_server", "own_pg_server"}  # the suite's PostgreSQL, and test_storage's own


def pytest_itemcollected(item):
    """Marks from what a test uses (as each test is collected: before pytest-xdist reads them)."""
    fixtures = item.fixturenames
    # `postgres`: the test starts or uses a PostgreSQL of its own, whatever the suite's backend.
    backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
    if POSTGRES_FIXTURES.intersection(fixtures) or backend == "postgres":
        item.add_marker(pytest.mark.postgres)
    defs = item._fixtureinfo.name2fixturedefs
    module = Path(item.fspath).name
    if module not in ONE_WORKER_MODULES and any(d[-1].scope == "module" for n in fixtures if (d := defs.get(n))):
        raise RuntimeError(f"{module} has a module-scoped fixture: add it to ONE_WORKER_MODULES in {__file__}")


# Modules whose tests share a module-scoped server (a cluster, a built wheel), which each
# pytest-xdist worker running one of their tests would start again: each runs whole on one
# worker; every other test is sent on its own. (pytest-xdist's `--dist loadgroup` would do
# it from marks, but it renames node ids, which pytest 9 no longer lets it do.)
ONE_WORKER_MODULES = {
    "test_attacks.py", "test_cluster.py", "test_cluster_changes.py", "test_cluster_order.py",
    "test_cluster_moderation.py", "test_cluster_presence.py", "test_dist.py", "test_slow_readers.py",
}  # fmt: skip


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # -n alone; an explicit --dist is left alone
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in ONE_WORKER_MODULES else nodeid

    return OneWorkerModules(config, log)


# -- an in-process chatd -------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def secret_key() -> str:
    return Fernet.generate_key().decode("ascii")


# CHATD_TEST_BACKEND=postgres: every in-process chatd of the suite stores in a fresh
# PostgreSQL database (a throwaway server, see pg_service.py) instead of SQLite.
TEST_BACKEND = os.environ.get("CHATD_TEST_BACKEND", "sqlite")
if TEST_BACKEND not in ("sqlite", "postgres"):
    raise RuntimeError(f"CHATD_TEST_BACKEND={TEST_BACKEND!r}: expected sqlite or postgres")


# The limit on new identities per address is off unless a test sets it: every test
# client is 127.0.0.1, and many tests make more guests than one address's burst
# (tests/test_guest_limit.py tests the limit itself, with small bursts).
NO_GUEST_LIMIT = {"guest_rate": 0.0}


@pytest.fixture
def make_config(request, data_dir: Path, secret_key: str):
    backend = {"database_url": request.getfixturevalue("pg_database_url")} if TEST_BACKEND == "postgres" else {}

    def make(**overrides) -> Config:
        return Config(**{"data_dir": data_dir, "secret_keys": (secret_key,), **NO_GUEST_LIMIT, **backend, **overrides})

    return make


@pytest.fixture
async def start_chatd(make_config):
    """Start a real chatd on a free port: `await start_chatd(session_ttl=3)` → base URL.

    Served the way `python -m chatd` serves (an `AppRunner` and a `TCPSite`); tests
    that need the app object use `aiohttp_server`."""
    runners: list[web.AppRunner] = []

    async def start(port: int | None = None, **overrides) -> str:
        runner = web.AppRunner(create_app(make_config(**overrides)), shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port or 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def base_url(start_chatd) -> str:
    return await start_chatd()


# -- clients -----------------------------------------------------------------


class Visitor:
    """One browser-like visitor: an HTTP client with its own cookie jar, and its sockets."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        # unsafe=True: keep cookies for the 127.0.0.1 test server.
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sockets: list[SocketClient] = []

    @property
    def cookie(self) -> str | None:
        for morsel in self.http.cookie_jar:
            if morsel.key == COOKIE_NAME:
                return morsel.value
        return None

    async def session(self) -> dict:
        async with self.http.get(self.base_url + "/api/session") as response:
            assert response.status == 200
            return await response.json()

    async def post(self, path: str, body=None, **kwargs) -> tuple[int, dict]:
        kwargs.setdefault("json", {} if body is None else body)
        async with self.http.post(self.base_url + path, **kwargs) as response:
            return response.status, await response.json()

    async def register(self, username: str, password: str = "correct horse") -> dict:
        status, body = await self.post("/api/register", {"username": username, "password": password})
        assert status == 201, body
        return body

    async def socket(self, transport: str = "websocket", **kwargs) -> SocketClient:
        """A connected socket carrying this visitor's cookie (a guest session first if need be)."""
        if self.cookie is None:
            await self.session()
        client = await connect_socket(self.base_url, cookie=self.cookie, transport=transport, **kwargs)
        self.sockets.append(client)
        return client

    async def close(self) -> None:
        for client in self.sockets:
            await client.close()
        await self.http.close()


@pytest.fixture
async def visitors(base_url):
    """`await visitors()` makes a new visitor of the default server; all are closed afterwards."""
    made: list[Visitor] = []

    async def make(url: str | None = None) -> Visitor:
        visitor = Visitor(url or base_url)
        made.append(visitor)
        return visitor

    yield make
    for visitor in made:
        await visitor.close()


def apply_presence(online: dict[str, dict], event: dict) -> None:
    """SPEC's rule: remove every `leaves` id, then add every `joins` entry."""
    for member in event["leaves"]:
        online.pop(member["id"], None)
    for member in event["joins"]:
        online[member["id"]] = member


def by_name(members) -> list[dict]:
    """SPEC's order of online lists: name without regard to case, then id."""
    return sorted(members, key=lambda m: (m["name"].casefold(), m["id"]))


class SocketClient:
    """A python-socketio AsyncClient that queues every event it receives, by name.

    It also keeps what a client knows of each room's online list (`online[room]`,
    member id -> Member): the snapshot of `welcome` or a `join` ack, then every
    `presence` event applied as SPEC says.
    """

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.queues: dict[str, asyncio.Queue] = defaultdict(asyncio.Queue)
        self.connect_error: dict | None = None
        self.disconnected = asyncio.Event()
        self.online: dict[str, dict[str, dict]] = {}
        self.id: str | None = None  # this session's member id, from `welcome`
        self.me: dict | None = None  # this session's Member, from `welcome`

        @self.sio.on("*")
        async def any_event(event, *args):
            payload = args[0] if len(args) == 1 else args
            if event == "welcome":
                self.id = payload["id"]
                self.me = {"id": payload["id"], "name": payload["name"], "account": payload["account"]}
                self.online[payload["room"]] = {m["id"]: m for m in payload["online"]}
            elif event == "presence" and payload["room"] in self.online:
                apply_presence(self.online[payload["room"]], payload)
            self.queues[event].put_nowait(payload)

        @self.sio.event
        async def connect_error(data):
            self.connect_error = data

        @self.sio.event
        async def disconnect(*_reason):
            self.disconnected.set()

    async def next(self, event: str, timeout: float = EVENT_TIMEOUT):
        return await asyncio.wait_for(self.queues[event].get(), timeout)

    async def nothing(self, event: str, wait: float = 0.3) -> None:
        """Assert that no `event` arrives within `wait` seconds."""
        await asyncio.sleep(wait)
        assert self.queues[event].empty(), f"unexpected {event!r}: {self.queues[event].get_nowait()!r}"

    def drain(self, event: str) -> list:
        items = []
        while not self.queues[event].empty():
            items.append(self.queues[event].get_nowait())
        return items

    async def call(self, event: str, payload=None, timeout: float = EVENT_TIMEOUT):
        answer = await self.sio.call(event, payload, timeout=timeout)
        if isinstance(answer, dict) and answer.get("ok"):
            if event == "join":
                self.online[answer["room"]] = {m["id"]: m for m in answer["online"]}
            elif event == "leave":
                self.online.pop(payload["room"], None)
        return answer

    def members(self, room: str = "general") -> list[dict]:
        """This client's online list of a room, in SPEC's order."""
        return by_name(self.online.get(room, {}).values())

    async def sees(self, room: str, expected: list[dict], timeout: float = 2.0) -> None:
        """Wait until this client's online list of `room` is `expected` (any order)."""
        deadline = time.monotonic() + timeout
        while self.members(room) != by_name(expected):
            if time.monotonic() > deadline:
                raise AssertionError(f"{room}: saw {self.members(room)}, expected {by_name(expected)}")
            await asyncio.sleep(0.01)

    async def emit(self, event: str, payload=None) -> None:
        await self.sio.emit(event, payload)

    async def close(self) -> None:
        async with self.no_long_poll_wait():
            if self.sio.connected:
                await self.sio.disconnect()
            await self.sio.shutdown()

    @contextlib.asynccontextmanager
    async def no_long_poll_wait(self):
        """Inside: a disconnect over polling (ours, or python-socketio's own after a refused
        connect) does not wait out the long-poll. python-engineio's client, once its CLOSE
        is sent, waits for its pending GET, which the server answers only at its next ping
        (pingInterval + 5 s: 30 s). A browser does not wait; neither do we: once the CLOSE
        is out (the write loop has ended), ending the client's own HTTP session ends that GET."""

        async def end_the_long_poll() -> None:
            eio = self.sio.eio
            while not (eio.state == "disconnecting" and eio.write_loop_task is None):  # the loop clears it as it ends
                await asyncio.sleep(0.01)
            if eio.current_transport == "polling" and eio.http is not None and not eio.http.closed:
                await eio.http.close()

        watcher = asyncio.ensure_future(end_the_long_poll())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def connect_socket(
    base_url: str, *, cookie: str | None, transport: str = "websocket", headers: dict | None = None
) -> SocketClient:
    """Connect and wait for `welcome`; raise socketio's ConnectionError when refused."""
    client = SocketClient()
    all_headers = dict(headers or {})
    if cookie is not None:
        all_headers["Cookie"] = f"{COOKIE_NAME}={cookie}"
    await client.sio.connect(base_url, headers=all_headers, transports=[transport], wait_timeout=EVENT_TIMEOUT)
    return client


async def refusal(base_url: str, *, cookie: str | None, transport: str = "websocket", headers=None) -> dict | None:
    """Try a handshake that must fail; the `connect_error` payload (None if refused before Socket.IO)."""
    client = SocketClient()
    all_headers = dict(headers or {})
    if cookie is not None:
        all_headers["Cookie"] = f"{COOKIE_NAME}={cookie}"
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            async with client.no_long_poll_wait():
                await client.sio.connect(base_url, headers=all_headers, transports=[transport], wait_timeout=EVENT_TIMEOUT)
        # Socket.IO's refusal is a dict; a transport-level one (Engine.IO said no) is a bare string.
        return client.connect_error if isinstance(client.connect_error, dict) else None
    finally:
        await client.close()


async def polling_handshake(base_url: str, *, cookie: str | None, headers: dict | None = None) -> list[str]:
    """A handshake over long polling by hand (the client library lingers 30 s for its long
    poll when it closes): the packets that answer the namespace CONNECT (`40{…` welcome,
    `44{…` refused), or [] when Engine.IO refuses the open itself."""
    all_headers = dict(headers or {})
    if cookie is not None:
        all_headers["Cookie"] = f"{COOKIE_NAME}={cookie}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base_url + "/socket.io/?EIO=4&transport=polling", headers=all_headers) as response:
            opened = await response.text()
        if response.status != 200:
            return []
        url = base_url + "/socket.io/?EIO=4&transport=polling&sid=" + json.loads(opened[1:])["sid"]
        async with http.post(url, data="40", headers=all_headers) as response:
            assert response.status == 200
        async with http.get(url, headers=all_headers) as response:
            return (await response.text()).split("\x1e")


# -- chatd as a process ----------------------------------------------------------


@pytest.fixture
def chatd_process(data_dir):
    """`chatd_process(*flags, env=…)` → a not-yet-started ChatdProcess; all are stopped afterwards."""
    made: list[ChatdProcess] = []

    def make(*args: str, **kwargs) -> ChatdProcess:
        kwargs.setdefault("data_dir", data_dir)
        process = ChatdProcess(*args, **kwargs)
        made.append(process)
        return process

    yield make
    for process in made:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


class RawSocket:
    """Socket.IO spoken by hand over one websocket, for frames a well-behaved client cannot send
    (lone surrogates, oversize frames, odd packets)."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.welcome = ""  # the `welcome` packet, for an accepted socket

    @classmethod
    async def connect(cls, base_url: str, cookie: str | None) -> tuple[RawSocket, str]:
        """Open the websocket and the `/` namespace; the socket and the server's answer to CONNECT."""
        http = aiohttp.ClientSession()
        headers = {"Cookie": f"{COOKIE_NAME}={cookie}"} if cookie else {}
        ws = await http.ws_connect(base_url + "/socket.io/?EIO=4&transport=websocket", headers=headers)
        raw = cls(http, ws)
        assert (await raw.recv()).startswith("0{")  # Engine.IO open
        await raw.send("40")
        # The CONNECT answer comes first; an accepted socket's `welcome` follows it (kept as `welcome`).
        answer = await raw.recv()
        if answer.startswith("40"):
            raw.welcome = await raw.recv_event('42["welcome"')
        return raw, answer

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def recv(self, timeout: float = EVENT_TIMEOUT) -> str:
        """The next Engine.IO text packet that is not a ping (pings are answered)."""
        while True:
            frame = await asyncio.wait_for(self.ws.receive(), timeout)
            if frame.type != aiohttp.WSMsgType.TEXT:
                return ""  # closed
            if frame.data == "2":
                await self.ws.send_str("3")
                continue
            return frame.data

    async def recv_event(self, prefix: str, timeout: float = EVENT_TIMEOUT) -> str:
        """Skip packets until one starts with `prefix` (e.g. '431' for the ack of id 1)."""
        deadline = time.monotonic() + timeout
        while True:
            packet = await self.recv(max(0.01, deadline - time.monotonic()))
            if packet.startswith(prefix) or packet == "":
                return packet

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()
