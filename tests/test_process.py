"""chatd as a user runs it: `python -m chatd` in a subprocess (issue 2: configuration, keys, process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time

import aiohttp
import pytest
from cryptography.fernet import Fernet

from conftest import ROOT, Visitor, connect_socket


def run_chatd(*args: str, env: dict | None = None, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_keygen_prints_a_fresh_fernet_key():
    first, second = run_chatd("keygen"), run_chatd("keygen")
    assert first.returncode == 0 and first.stderr == ""
    key = first.stdout.strip()
    Fernet(key)  # raises if it is not a key
    assert key != second.stdout.strip()


def test_help_explains_every_flag_and_its_environment_variable():
    result = run_chatd("--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--data-dir", "--session-ttl", "--secure-cookie", "--allow-origin", "--log-level"):
        assert flag in result.stdout
        assert "CHATD_" + flag[2:].upper().replace("-", "_") in result.stdout
    assert "keygen" in result.stdout


@pytest.mark.parametrize(
    "args,env,words",
    [
        ((), {"CHATD_SECRET_KEYS": "not-a-key"}, "CHATD_SECRET_KEYS"),
        (("--port", "eighty"), {}, "--port"),
        ((), {"CHATD_SESSION_TTL": "-5"}, "CHATD_SESSION_TTL"),
        ((), {"CHATD_SECURE_COOKIE": "maybe"}, "CHATD_SECURE_COOKIE"),
        (("--allow-origin", "*"), {}, "--allow-origin"),
        (("--log-level", "loud"), {}, "--log-level"),
    ],
    ids=["malformed key", "port", "ttl", "boolean", "origin", "log level"],
)
def test_bad_configuration_is_one_line_on_stderr_and_exit_2(tmp_path, args, env, words):
    result = run_chatd("--data-dir", str(tmp_path), *args, env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_key_file_and_unusable_database_exit_2(tmp_path):
    bad_key_dir = tmp_path / "badkey"
    bad_key_dir.mkdir()
    (bad_key_dir / "secret.key").write_text("garbage\n")
    result = run_chatd("--data-dir", str(bad_key_dir), env={"CHATD_SECRET_KEYS": ""})
    assert result.returncode == 2 and "secret.key" in result.stderr and "Traceback" not in result.stderr

    # A directory where the database file should be: SQLite cannot open it.
    bad_db_dir = tmp_path / "baddb"
    (bad_db_dir / "chatd.sqlite3").mkdir(parents=True)
    result = run_chatd("--data-dir", str(bad_db_dir), "--port", "0", env={"CHATD_SECRET_KEYS": ""})
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_taken_port_exits_2(chatd_process):
    first = chatd_process(env={"CHATD_SECRET_KEYS": ""})
    first.start()
    # Another data dir: a shared one is refused before the port is tried (test_storage.py).
    other_dir = first.data_dir.parent / "other"
    result = run_chatd("--port", str(first.port), "--data-dir", str(other_dir), env={"CHATD_SECRET_KEYS": ""})
    assert result.returncode == 2 and "cannot listen" in result.stderr, result
    assert first.stop() == 0


async def test_first_start_creates_a_private_key_file_and_reuses_it(chatd_process, data_dir):
    env = {"CHATD_SECRET_KEYS": ""}
    server = chatd_process(env=env)
    url = server.start()
    key_file = data_dir / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    visitor = Visitor(url)
    try:
        before = await visitor.session()
        assert server.stop() == 0
        server.start()
        assert key_file.read_text() == key
        assert await visitor.session() == before  # the cookie outlived the restart
    finally:
        await visitor.close()


async def test_environment_variables_configure_chatd(chatd_process, data_dir):
    port_server = chatd_process(env={"CHATD_SECRET_KEYS": "", "CHATD_SESSION_TTL": "123"})
    url = port_server.start()
    async with aiohttp.ClientSession() as http, http.get(url + "/api/session") as response:
        body = await response.json()
        assert "Max-Age=123" in response.headers["Set-Cookie"]
    assert 120 <= body["expires_at"] - time.time() <= 124
    # A flag wins over its environment variable.
    assert port_server.stop() == 0
    flagged = chatd_process("--session-ttl", "60", env={"CHATD_SECRET_KEYS": "", "CHATD_SESSION_TTL": "123"})
    url = flagged.start()
    async with aiohttp.ClientSession() as http, http.get(url + "/api/session") as response:
        assert "Max-Age=60" in response.headers["Set-Cookie"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_sockets_and_exits_0_within_5_seconds(chatd_process, sig):
    server = chatd_process(env={"CHATD_SECRET_KEYS": ""})
    url = server.start()
    # The printed URL serves the page.
    async with aiohttp.ClientSession() as http, http.get(url + "/") as response:
        assert response.status == 200 and "<title>chatd</title>" in await response.text()
    visitor = Visitor(url)
    try:
        await visitor.session()
        socket = await connect_socket(url, cookie=visitor.cookie)
        await socket.next("welcome")
        started = time.monotonic()
        returncode = await asyncio.to_thread(server.stop, sig)
        elapsed = time.monotonic() - started
        assert returncode == 0
        assert elapsed < 5, elapsed
        await asyncio.wait_for(socket.disconnected.wait(), 2)  # told, not left hanging
        await socket.close()
    finally:
        await visitor.close()


async def test_stderr_never_carries_secrets(chatd_process):
    key = Fernet.generate_key().decode()
    server = chatd_process("--log-level", "debug", env={"CHATD_SECRET_KEYS": key})
    url = server.start()
    visitor = Visitor(url)
    try:
        await visitor.session()
        status, _ = await visitor.post("/api/register", {"username": "secretive", "password": "hunter2hunter2"})
        assert status == 201
        socket = await connect_socket(url, cookie=visitor.cookie)
        await socket.next("welcome")
        await socket.close()
        cookie = visitor.cookie
    finally:
        await visitor.close()
    assert server.stop() == 0
    logs = server.proc_output
    assert logs, "debug logging printed nothing: the check below would be empty"
    sid = json.loads(Fernet(key).decrypt(cookie.encode()))["session"]["sid"]
    for secret in (key, "hunter2hunter2", cookie, sid, "argon2id$"):
        assert secret not in logs


async def test_every_acked_message_survives_kill_9(chatd_process):
    """SPEC: once acked, a message survives a restart. 400 messages sent at once (so
    they share group commits), SIGKILL (no shutdown) the moment the last ack is in:
    every acked message is stored."""
    process = chatd_process("--chat-rate", "0")
    visitor = Visitor(process.start())
    socket = await visitor.socket()
    await socket.next("welcome")
    results = await asyncio.gather(*(socket.call("send chat", {"msg": f"m{i}"}) for i in range(400)))
    process.stop(signal.SIGKILL)
    acked = {r["id"]: f"m{i}" for i, r in enumerate(results) if r.get("ok")}
    await visitor.close()
    assert len(acked) == 400

    again = Visitor(chatd_process("--chat-rate", "0").start())
    socket = await again.socket()
    await socket.next("welcome")
    stored: dict[int, str] = {}
    query = {"room": "general", "limit": 100}  # the latest, then page back
    while page := (await socket.call("history", query))["messages"]:
        stored.update((m["id"], m["msg"]) for m in page)
        query["before"] = page[0]["id"]
    await again.close()
    assert acked == stored
