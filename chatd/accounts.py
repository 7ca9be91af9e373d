"""Accounts: username and password rules, and password hashing off the event loop.

Passwords are stored only as argon2id hashes (argon2-cffi). Hashing runs in a
small thread pool of its own, so logins never stall chat and never take every
thread of the loop's default executor.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError

from .storage import Storage

USERNAME_RE = re.compile(r"[A-Za-z0-9_.\-]{3,24}")
PASSWORD_MIN = 8
PASSWORD_MAX = 128


def username_problem(username: str) -> str | None:
    """Why a username cannot be registered, or None."""
    if not USERNAME_RE.fullmatch(username):
        return "Usernames are 3 to 24 characters of letters, digits, '_', '.' and '-'."
    if username.lower().startswith("guest"):
        return "Usernames may not start with 'guest'."
    return None


def password_problem(password: str) -> str | None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        return f"Passwords are {PASSWORD_MIN} to {PASSWORD_MAX} characters."
    return None


def _bytes(password: str) -> bytes:
    # surrogatepass: JSON can carry a lone surrogate, which plain UTF-8 refuses to encode.
    return password.encode("utf-8", "surrogatepass")


# Internal, for the test suite only (no flag, not in SPEC; the README's Development notes it): set to 1, chatd
# hashes with argon2's cheapest parameters, so the hundreds of registrations and logins
# the tests make cost microseconds instead of ~0.1 s of CPU each. Verification reads the
# parameters from each stored hash, so either kind of hash still verifies.
CHEAP_HASHES_ENV = "CHATD_TEST_CHEAP_HASHES"


def _password_hasher() -> PasswordHasher:
    if os.environ.get(CHEAP_HASHES_ENV) == "1":
        return PasswordHasher.from_parameters(profiles.CHEAPEST)
    return PasswordHasher()  # argon2id, RFC 9106 low-memory profile


# Niceness of the hashing threads (and of the threads argon2 starts from them).
HASH_THREAD_NICENESS = 10


def _yield_to_the_loop() -> None:
    """Run this hashing thread at a lower CPU priority than the event loop.

    argon2 is CPU-bound and, with parallelism 4, runs four threads per hash: on
    a busy machine they would otherwise take the CPU time the event loop needs
    to keep chat moving. On Linux the nice value is per thread and inherited by
    the threads a thread starts; elsewhere this does nothing.
    """
    if not HASH_THREAD_NICENESS:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICENESS)
    except (AttributeError, OSError):
        pass


class Accounts:
    def __init__(self, storage: Storage, *, hash_threads: int = 2) -> None:
        self.storage = storage
        self._hasher = _password_hasher()
        self._pool = ThreadPoolExecutor(
            max_workers=hash_threads, thread_name_prefix="chatd-hash", initializer=_yield_to_the_loop
        )
        self._dummy_hash: str | None = None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def warm_up(self) -> None:
        """Hash the dummy once at start-up, so the first unknown username costs no more than later ones."""
        self._dummy_hash = await self._run(self._hasher.hash, "chatd dummy password")

    async def register(self, username: str, password: str) -> bool:
        """Create the account; False when the username is taken (without regard to case)."""
        if await self.storage.find_account(username) is not None:
            return False
        password_hash = await self._run(self._hasher.hash, _bytes(password))
        return await self.storage.create_account(username, password_hash)

    async def verify(self, username: str, password: str) -> str | None:
        """The account's username when the pair is right, else None, in about the same time either way."""
        account = await self.storage.find_account(username) if USERNAME_RE.fullmatch(username) else None
        if account is None:
            # Spend the same work on a dummy hash, so timing does not tell who exists.
            if self._dummy_hash is None:
                await self.warm_up()
            await self._run(self._check, self._dummy_hash, password)
            return None
        return account.username if await self._run(self._check, account.password_hash, password) else None

    def _check(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, _bytes(password))
        except (VerificationError, InvalidHashError):
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
