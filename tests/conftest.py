"""Shared test parts: a real chatd (in-process, served as `python -m chatd` serves it
or through `aiohttp_server`, or as a `python -m chatd` subprocess) and real clients (aiohttp for HTTP,
python-socketio's AsyncClient for sockets). Nothing here is mocked."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest
import socketio
from aiohttp import web
from cryptography.fernet import Fernet

from chatd.__main__ import SHUTDOWN_SECONDS
from chatd.config import Config
from chatd.sessions import COOKIE_NAME
from chatd.web import create_app
from pg_service import pg_database_url, pg_server  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
EVENT_TIMEOUT = 3.0


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


@pytest.fixture
def make_config(request, data_dir: Path, secret_key: str):
    backend = {"database_url": request.getfixturevalue("pg_database_url")} if TEST_BACKEND == "postgres" else {}

    def make(**overrides) -> Config:
        return Config(**{"data_dir": data_dir, "secret_keys": (secret_key,), **backend, **overrides})

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
        if self.sio.connected:
            await self.sio.disconnect()
        await self.sio.shutdown()


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
            await client.sio.connect(base_url, headers=all_headers, transports=[transport], wait_timeout=EVENT_TIMEOUT)
        # Socket.IO's refusal is a dict; a transport-level one (Engine.IO said no) is a bare string.
        return client.connect_error if isinstance(client.connect_error, dict) else None
    finally:
        await client.close()


# -- chatd as a process ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChatdProcess:
    """`python -m chatd` in a subprocess, as a user runs it."""

    def __init__(self, *args: str, data_dir: Path, port: int | None = None, env: dict | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        # Logs go to a file, not a pipe: an unread pipe would block a chatty server.
        self.log_path = data_dir.parent / f"chatd-{self.port}.log"
        self.args = ["--port", str(self.port), "--data-dir", str(data_dir), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        """Start and wait for the 'serving on' line; the base URL."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatd", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if "serving on" in line:
                    return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd exited {self.proc.returncode}: {self.proc_output}")
        raise RuntimeError("chatd did not start in time")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.stdout.close()

    @property
    def proc_output(self) -> str:
        """Everything the process wrote to stderr (its log) so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""


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
