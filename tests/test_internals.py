"""Library internals stay in chatd/sio, listed; their shapes are what chatd/sio expects;
no background task is created without an owner.

setup.cfg pins each library whose internals chatd/sio uses; when an upgrade moves
one of these shapes, this fails first, and chatd/sio must be checked against the
new sources."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import aiohttp.http_writer
import aiohttp.web
import engineio
import socketio
from engineio import async_server, async_socket, base_server, base_socket
from engineio.async_drivers import aiohttp as engineio_aiohttp
from socketio.async_pubsub_manager import AsyncPubSubManager

from chatd.sio.engine import DirectSocket, EngineServer, EngineSocket
from chatd.sio.managers import FastBroadcastMixin, RoomIndex

from conftest import ROOT

CHATD = ROOT / "chatd"
SIO = CHATD / "sio"
LIBRARIES = ("aiohttp", "aiohttp_session", "engineio", "socketio")


def source(obj) -> str:
    return inspect.getsource(obj)


def test_engineio_creates_plain_sockets_and_hands_the_websocket_its_bound_handler():
    # DirectWebSocket finds the engine.io socket as `handler.__self__` and, for a
    # websocket-first connection, switches it to DirectSocket (no __slots__ anywhere).
    assert "self._websocket_handler, self.server)" in source(async_socket.AsyncSocket._upgrade_websocket)
    assert "self.connected = True" in source(async_socket.AsyncSocket._websocket_handler)
    for cls in async_socket.AsyncSocket.__mro__[:-1]:
        assert "__slots__" not in vars(cls), cls
    assert DirectSocket.__mro__[1:3] == (EngineSocket, async_socket.AsyncSocket)


def test_engineio_session_opening_and_requests_are_what_engine_py_repeats_and_guards():
    # EngineServer._open_session repeats engine.io's _handle_connect with its own socket class.
    connect = source(async_server.AsyncServer._handle_connect)
    for step in (
        "self.service_task_handle = self.start_background_task(\n                self._service_task)",
        "s = async_socket.AsyncSocket(self, sid)",
        "self.sockets[sid] = s",
        "'pingInterval': int(\n                self.ping_interval + self.ping_interval_grace_period) * 1000,",
        "ret = await self._trigger_event('connect', sid, environ,\n                                        run_async=False)",
        "s.schedule_ping()",
        "ret = await s.handle_get_request(environ)",
        "s.connected = True",
        "return self._ok(await s.poll(), headers=headers,",
    ):
        assert step in connect, step
    # What the overrides of handle_request, _ok and handle_post_request stand in for.
    request = source(async_server.AsyncServer.handle_request)
    assert "transport = query.get('transport', ['polling'])[0]" in request
    assert "await socket.handle_post_request(environ)\n                        r = self._ok(" in request
    assert "except exceptions.EngineIOError:\n                        if sid in self.sockets:" in request
    assert "'response': b'OK'}" in source(base_server.BaseServer._ok)
    post = source(async_socket.AsyncSocket.handle_post_request)
    assert "(await environ['wsgi.input'].read(length)).decode('utf-8')" in post
    assert "payload.Payload(encoded_payload=body)" in post
    assert "return [packet.Packet(packet.NOOP)]" in source(async_socket.AsyncSocket.handle_get_request)
    assert "if packets == [None]:" in source(async_socket.AsyncSocket.poll)


def test_engineio_socket_state_and_methods_we_use():
    socket = base_socket.BaseSocket.__new__(base_socket.BaseSocket)
    base_socket.BaseSocket.__init__(socket, type("S", (), {"create_queue": lambda self: object()})(), "sid")
    for name in ("queue", "last_ping", "connected", "upgraded", "closing", "closed"):
        assert hasattr(socket, name), name
    for name in ("send", "receive", "close", "check_ping_timeout", "schedule_ping", "_send_ping"):
        assert callable(getattr(async_socket.AsyncSocket, name)), name
    # The ping task we replace with a timer, recognised by its target.
    assert "start_background_task(self._send_ping)" in source(async_socket.AsyncSocket.schedule_ping)
    assert "self.last_ping = time.time()" in source(async_socket.AsyncSocket._send_ping)
    assert "packet.PING" in source(async_socket.AsyncSocket._send_ping)


def test_engineio_aiohttp_driver_shape():
    params = list(inspect.signature(engineio_aiohttp.WebSocket.__init__).parameters)
    assert params == ["self", "handler", "server"]
    assert "self._sock = WebSocketResponse(" in source(engineio_aiohttp.WebSocket.__call__)
    assert "self._sock" in source(engineio_aiohttp.WebSocket.close)
    assert engineio_aiohttp._async["websocket"] is engineio_aiohttp.WebSocket
    assert "self.server._async['websocket'](" in source(async_socket.AsyncSocket._upgrade_websocket)
    server = EngineServer(async_mode="aiohttp")
    assert issubclass(server._async["websocket"], engineio_aiohttp.WebSocket)


def test_socketio_builds_its_engineio_server_from_the_hook_and_passes_our_options():
    assert "self._engineio_server_class()(**engineio_options)" in source(socketio.base_server.BaseServer.__init__)
    assert socketio.AsyncServer._engineio_server_class(None) is engineio.AsyncServer
    sio = socketio.AsyncServer(async_mode="aiohttp")
    assert sio.manager is not None and hasattr(sio, "eio")


def test_socketio_manager_emit_is_what_the_mixin_replaces():
    params = list(inspect.signature(socketio.AsyncManager.emit).parameters)
    assert params[:8] == ["self", "event", "data", "namespace", "room", "skip_sid", "callback", "to"]
    assert "self.get_participants(namespace, room)" in source(socketio.AsyncManager.emit)
    assert "self.server._send_eio_packet(eio_sid, p)" in source(socketio.AsyncManager.emit)
    assert "def get_participants(self, namespace, room)" in source(socketio.base_manager.BaseManager)


def test_socketio_manager_rooms_layout_we_read():
    # RoomIndex.room_size reads a room's size from it instead of walking the room.
    assert "self.rooms = {}  # self.rooms[namespace][room][sio_sid] = eio_sid" in source(
        socketio.base_manager.BaseManager.__init__
    )
    assert "self.rooms[namespace][room] = bidict()" in source(socketio.base_manager.BaseManager.basic_enter_room)


def test_socketio_reads_a_room_as_a_bidict_only_where_room_index_replaces_it():
    # RoomIndex keeps every room but the namespace's sid map (room None) as a plain dict,
    # and replaces get_participants, the one reader of a room's bidict internals.
    package = Path(socketio.__file__).parent
    uses = sorted(
        (path.name, line.strip())
        for path in package.glob("*.py")
        for line in path.read_text().splitlines()
        if any(name in line for name in ("_fwdm", "_invm", ".inverse", ".inv["))
    )
    assert uses == [
        ("base_manager.py", "participants = ns[room[0]]._fwdm.copy() if room[0] in ns else {}"),
        ("base_manager.py", "participants = ns[room]._fwdm.copy() if room in ns else {}"),
        ("base_manager.py", "participants.update(ns[r]._fwdm if r in ns else {})"),
        ("base_manager.py", "return self.rooms[namespace][None]._invm[eio_sid]"),
    ], uses
    assert "def get_participants(" in source(RoomIndex)
    # The rest of python-socketio treats a room as a mapping: a plain dict behaves the same.
    assert "del self.rooms[namespace][room][sid]" in source(socketio.base_manager.BaseManager.basic_leave_room)


def test_pubsub_managers_deliver_locally_through_the_mixin():
    assert "await super().emit(" in source(AsyncPubSubManager._handle_emit)

    class FastRedisManager(socketio.AsyncRedisManager, FastBroadcastMixin):
        pass

    mro = FastRedisManager.__mro__
    assert mro.index(AsyncPubSubManager) < mro.index(FastBroadcastMixin) < mro.index(socketio.AsyncManager)


def test_aiohttp_websocket_api_we_use():
    ws = aiohttp.web.WebSocketResponse(compress=False)
    assert ws.compress is False and ws.closed is False
    # Headers held back until the first write, which carries them (DirectWebSocket).
    assert ws._send_headers_immediately is True
    assert "if self._send_headers_immediately:" in source(aiohttp.web.StreamResponse._write_headers)
    assert "self._send_headers_with_payload(chunk, False)" in source(aiohttp.http_writer.StreamWriter.write)
    assert "def send_headers(self)" in source(aiohttp.http_writer.StreamWriter)
    assert "timeout" in inspect.signature(aiohttp.web.WebSocketResponse.receive).parameters
    assert isinstance(aiohttp.web.Request.transport, property)


# -- private names stay in chatd/sio, and are listed there ---------------------------------


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_private_names() -> set[str]:
    """Every private name a library defines or uses: methods, attributes, module globals."""
    names: set[str] = set()
    for library in LIBRARIES:
        folder = Path(importlib.util.find_spec(library).origin).parent
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = node.name
                elif isinstance(node, ast.Attribute):
                    name = node.attr
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    name = node.id
                else:
                    continue
                if _is_private(name):
                    names.add(name)
    return names


LIBRARY_PRIVATE = _library_private_names()


class _Uses(ast.NodeVisitor):
    """Private library names a module touches, each with whether it is certainly a library's.

    Certain: `from lib import _name`, and inside a class that subclasses a library
    class, a method `_name` (an override) or `self._name`. Likely: `x._name` or
    `getattr(x, "_name")` on another object, when a library has that name (the
    caller decides whether chatd's own objects have it too).
    """

    def __init__(self, tree: ast.Module) -> None:
        self.found: list[tuple[int, str, bool]] = []
        self.library_aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in LIBRARIES:
                        self.library_aliases.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                for alias in node.names:
                    self.library_aliases.add(alias.asname or alias.name)
                    if _is_private(alias.name):
                        self.found.append((node.lineno, alias.name, True))
        self.in_library_class = [False]
        self.visit(tree)

    def _base_root(self, base: ast.expr) -> str | None:
        while isinstance(base, (ast.Attribute, ast.Call, ast.Subscript)):
            base = base.func if isinstance(base, ast.Call) else base.value
        return base.id if isinstance(base, ast.Name) else None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.in_library_class.append(any(self._base_root(b) in self.library_aliases for b in node.bases))
        self.generic_visit(node)
        self.in_library_class.pop()

    def _method(self, node) -> None:
        if self.in_library_class[-1] and node.name in LIBRARY_PRIVATE:
            self.found.append((node.lineno, node.name, True))
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = _method

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in LIBRARY_PRIVATE:
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self:
                self.found.append((node.lineno, node.attr, False))
            elif self.in_library_class[-1]:
                self.found.append((node.lineno, node.attr, True))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr"):
            for arg in node.args[1:2]:
                if isinstance(arg, ast.Constant) and arg.value in LIBRARY_PRIVATE:
                    self.found.append((node.lineno, arg.value, False))
        self.generic_visit(node)


def private_uses(path: Path) -> list[tuple[int, str, bool]]:
    return _Uses(ast.parse(path.read_text())).found


def _defined_private_names(paths) -> set[str]:
    """Private names chatd's own code defines (methods, and attributes it sets on `self`)."""
    own: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(node.name):
                own.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and _is_private(node.attr)
            ):  # `self._x = …`: setting a private name on another object defines nothing
                own.add(node.attr)
    return own


OUTSIDE_SIO = sorted(path for path in CHATD.rglob("*.py") if SIO not in path.parents)


def test_no_library_private_name_outside_chatd_sio():
    own = _defined_private_names(OUTSIDE_SIO)
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in OUTSIDE_SIO
        for line, name, certain in private_uses(path)
        if certain or name not in own
    ]
    assert not found, "library internals outside chatd/sio:\n" + "\n".join(found)


def test_the_scan_finds_a_private_name(tmp_path):
    """The scan itself can fail: private names of each library, reached the ways chatd/sio does."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import socketio\nfrom engineio.async_socket import AsyncSocket\n"
        "class S(socketio.AsyncServer):\n    def _handle_eio_message(self, a, b):\n        return self._send_packet\n"
        "def f(ws, server):\n    ws._sock.close()\n    return getattr(server, '_async')\n"
    )
    names = {name for _, name, _certain in private_uses(sample)}
    assert {"_handle_eio_message", "_send_packet", "_sock", "_async"} <= names


def test_every_private_name_used_in_chatd_sio_is_listed():
    """A library's private name used in chatd/sio is named in its __init__.py (chatd/sio's own
    private helpers, which no library class defines, are not the libraries')."""
    listed = (SIO / "__init__.py").read_text()
    sio_files = sorted(SIO.glob("*.py"))
    own = _defined_private_names(sio_files) - _library_class_private_names()
    missing = sorted(
        {
            f"{path.name}: {name}"
            for path in sio_files
            for _, name, _certain in private_uses(path)
            if name not in own and not re.search(rf"\b{name}\b", listed)
        }
    )
    assert not missing, f"used in chatd/sio but not listed in its __init__.py: {missing}"


def _library_class_private_names() -> set[str]:
    """Private names defined by the library classes chatd/sio subclasses (methods and self attributes)."""
    import engineio.async_drivers.aiohttp
    import engineio.async_socket
    import socketio.async_pubsub_manager

    classes = (
        engineio.AsyncServer, engineio.async_socket.AsyncSocket, engineio.async_drivers.aiohttp.WebSocket,
        socketio.AsyncServer, socketio.AsyncManager, socketio.async_pubsub_manager.AsyncPubSubManager,
        socketio.AsyncRedisManager, aiohttp.web.WebSocketResponse,
    )  # fmt: skip
    names = set()
    for cls in classes:
        for klass in cls.__mro__[:-1]:
            names.update(name for name in vars(klass) if _is_private(name))
            try:
                names.update(re.findall(r"self\.(_[a-z]\w*)\s*=", inspect.getsource(klass)))
            except (OSError, TypeError):  # a class made at run time (python-socketio's bidict)
                pass
    return names


# -- every background task has an owner ------------------------------------------------------

TASK_MAKERS = {"ensure_future", "create_task", "run_coroutine_threadsafe"}


def test_background_tasks_are_started_only_by_their_owner():
    """chatd/tasks.py's TaskOwner keeps each task, logs its failure and cancels it at shutdown."""
    found = []
    for path in sorted(CHATD.rglob("*.py")):
        if path == CHATD / "tasks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
                if name in TASK_MAKERS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, "tasks created without an owner (use chatd.tasks.TaskOwner):\n" + "\n".join(found)


# -- pins and the version check ---------------------------------------------------------------


def test_pins_have_floors_and_ceilings_that_match_the_version_check():
    from chatd.sio.versions import TESTED

    setup = (ROOT / "setup.cfg").read_text()
    for name, (floor, ceiling) in TESTED.items():
        assert re.search(rf"^\s*{re.escape(name)}>={re.escape(floor)},<{re.escape(ceiling)}\s*$", setup, re.M), name


def test_chatd_refuses_an_untested_library_version_with_one_line(tmp_path):
    # A distribution's metadata found first on the path is the version importlib.metadata reports.
    fake = tmp_path / "aiohttp-3.99.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: aiohttp\nVersion: 3.99.0\n")
    result = subprocess.run(
        [sys.executable, "-m", "chatd", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "aiohttp 3.99.0" in lines[0] and ">=3.14.0,<3.15" in lines[0], result.stderr


def test_engineio_queues_come_from_create_queue_and_asyncio_queues_put_and_get_through_the_nowait_methods():
    # BoundedQueue (engine.py) counts the packets waiting for a slow reader in these two methods.
    import asyncio

    assert "self.queue = self.server.create_queue()" in source(base_socket.BaseSocket.__init__)
    assert "self.put_nowait(item)" in source(asyncio.Queue.put)
    assert "self.get_nowait()" in source(asyncio.Queue.get)
    assert "_drain_helper()" in source(aiohttp.http_writer.StreamWriter.drain)
