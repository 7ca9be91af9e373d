"""A throwaway nginx (Debian's package) in front of chatd processes, for tests and `make cluster`.

`start_nginx(["127.0.0.1:8001", "127.0.0.1:8002"])` writes a main config around
deploy/nginx-chatd.conf (the same server block docs/deploy.md shows) into a
temp dir — pid file, logs and temp paths there too — runs nginx in the
foreground on a free loopback port, and returns an `NginxService` (its `url`,
and `stop()`, which ends exactly that nginx by its PID and removes the dir; services.py).
Runs as root (workers as root too, so they can use the temp dir) or as any user.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from services import Service, free_port, skip_or_fail

NGINX = Path(os.environ.get("CHATD_NGINX", "/usr/sbin/nginx"))
SERVER_BLOCK = Path(__file__).resolve().parent.parent / "deploy" / "nginx-chatd.conf"

MAIN_CONFIG = """\
# Written by tests/nginx_service.py: a throwaway nginx in {directory}.
{user}
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;

{server_block}
}}
"""


class NginxService(Service):
    name = "nginx"
    stop_signal = signal.SIGTERM  # fast shutdown: open sockets are closed
    remove_on_stop = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> str:
        return self.log


def nginx_missing() -> str | None:
    if not os.access(NGINX, os.X_OK):
        return f"{NGINX} is missing (Debian's nginx-light package)"
    return None


def server_block(upstreams: list[str], listen: str, balance: str | None = None) -> str:
    """deploy/nginx-chatd.conf with its placeholders filled in.

    `balance` replaces its `ip_hash;` for tests whose clients all come from 127.0.0.1
    (ip_hash would send them all to one process), e.g. "hash $arg_client;": a key
    each client repeats on every request, so a polling client still sticks to one process.
    """
    servers = "\n".join(f"    server {address};" for address in upstreams)
    block = SERVER_BLOCK.read_text().replace("@UPSTREAM_SERVERS@", servers).replace("@LISTEN@", listen)
    if balance is not None:
        assert block.count("    ip_hash;\n") == 1
        block = block.replace("    ip_hash;\n", f"    {balance}\n")
    return block


def start_nginx(upstreams: list[str], port: int | None = None, balance: str | None = None) -> NginxService:
    port = port or free_port()
    directory = Path(tempfile.mkdtemp(prefix="chatd-nginx-"))
    block = "    " + server_block(upstreams, f"127.0.0.1:{port}", balance).replace("\n", "\n    ")
    # As root, nginx's workers would drop to `nobody`, who cannot use this
    # private temp dir; as anyone else, workers stay the current user anyway.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(MAIN_CONFIG.format(directory=directory, user=user, server_block=block))
    # -e: the error log from the first moment (before the config is read), not /var/log/nginx.
    args = [str(NGINX), "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")]
    check = subprocess.run([*args, "-t", "-q"], capture_output=True, text=True)
    if check.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"nginx refused its config: {check.stderr.strip()}")
    service = NginxService(args, port=port, directory=directory, log_path=directory / "error.log")
    return service.start()


@pytest.fixture
def start_proxy():
    """`start_proxy(["127.0.0.1:PORT", …])` → a running NginxService; all are stopped afterwards."""
    missing = nginx_missing()
    if missing:
        skip_or_fail(missing + " — `make system-deps` as root installs it")
    made: list[NginxService] = []

    def start(upstreams: list[str]) -> NginxService:
        service = start_nginx(upstreams)
        made.append(service)
        return service

    yield start
    for service in made:
        service.stop()
