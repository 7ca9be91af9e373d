"""One way to run a throwaway server for the tests and `make cluster`: a process on a free
loopback port, started, waited for until it is ready, and stopped by its PID (never by
name). redis_service.py, nginx_service.py, pg_service.py and `ChatdProcess` below are
each a command line and a readiness check around `Service`.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_or_fail(reason: str) -> None:
    """A missing server: a loud skip, or a failure under CI=true."""
    message = f"CLUSTER TESTS NOT RUN: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure)", pytrace=False)
    warnings.warn(message, UserWarning, stacklevel=2)
    pytest.skip(message)


class Service:
    """A server process. `start()` runs `command` and waits until `ready()` (by default:
    its port accepts connections); `stop()` ends exactly that process (`stop_signal`, then
    SIGKILL after `timeout`) and gives its exit status; `destroy()` also removes its
    `directory`. `start()` after `stop()` starts it again."""

    name = "server"
    stop_signal = signal.SIGTERM
    remove_on_stop = False  # stop() also removes `directory` (a server with nothing to keep)

    def __init__(
        self,
        command: list[str],
        *,
        port: int,
        log_path: Path,
        directory: Path | None = None,
        env: dict | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stdout=subprocess.DEVNULL,
        new_session: bool = True,
    ) -> None:
        self.command, self.port, self.log_path, self.directory = command, port, log_path, directory
        self.env, self.cwd, self.user, self.stdout, self.new_session = env, cwd, user, stdout, new_session
        self.proc: subprocess.Popen | None = None

    def ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    @property
    def log(self) -> str:
        """What the process wrote to its log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _as_user(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid, "extra_groups": []}

    def start(self, timeout: float = 20.0):
        with open(self.log_path, "a") as log:
            # A session of its own (new_session): a Ctrl-C meant for `make cluster` reaches it only through stop().
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=log, text=True,
                env=self.env, cwd=self.cwd, start_new_session=self.new_session, **self._as_user(),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: {self.log[-2000:]}")
            if self.ready():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {timeout} s: {self.log[-2000:]}")

    def stop(self, sig: int | None = None, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig or self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.remove_on_stop:
            self._remove_directory()
        return self.proc.returncode

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class ChatdProcess(Service):
    """`python -m chatd` in a subprocess, as a user runs it; ready at its 'serving on' line.

    Logs go to a file, not a pipe: an unread pipe would block a chatty server."""

    name = "chatd"

    def __init__(
        self,
        *args: str,
        data_dir: Path,
        port: int | None = None,
        env: dict | None = None,
        new_session: bool = False,
        command: tuple[str, ...] = (sys.executable, "-m", "chatd"),
        cwd: Path = ROOT,
        base_env: dict | None = None,
    ) -> None:
        """`env` is added to `base_env` (by default this process's environment)."""
        port = port or free_port()
        self.data_dir = data_dir
        self.args = ["--port", str(port), "--data-dir", str(data_dir), *args]
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(
            [*command, *self.args], port=port, log_path=data_dir.parent / f"chatd-{port}.log",
            # As in conftest's make_config: no limit on new identities unless a flag or `env` sets one.
            env={"CHATD_GUEST_RATE": "0", **(os.environ if base_env is None else base_env), **(env or {})}, cwd=cwd,
            stdout=subprocess.PIPE, new_session=new_session,
        )  # fmt: skip

    def ready(self) -> bool:
        while select.select([self.proc.stdout], [], [], 0.1)[0]:
            line = self.proc.stdout.readline()
            if "serving on" in line:
                return True
            if not line:
                return False
        return False

    def start(self, timeout: float = 20.0) -> str:
        """Start and wait for the 'serving on' line; the base URL."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        super().start(timeout)
        return self.url

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        try:
            return super().stop(sig, timeout)
        finally:
            self.proc.stdout.close()

    @property
    def proc_output(self) -> str:
        """Everything the process wrote to stderr (its log) so far."""
        return self.log
