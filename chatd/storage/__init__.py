"""Durable state: accounts, messages and revoked session ids.

`Storage` is the whole interface the rest of chatd uses; one module per
backend implements it (`sqlite.py`; PostgreSQL to come). The app factory picks
the backend from the configuration.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

HISTORY_DEFAULT = 50
HISTORY_MAX = 100


class StorageError(Exception):
    """Storage is unreachable or broken."""


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    password_hash: str


class Storage(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StorageError when storage cannot answer."""

    @abc.abstractmethod
    async def add_message(self, room: str, name: str, account: str | None, msg: str, ts: float) -> dict:
        """Store a message durably and return it with its id (Message shape of SPEC)."""

    @abc.abstractmethod
    async def history(
        self, room: str, *, before: int | None = None, after: int | None = None, limit: int = HISTORY_DEFAULT
    ) -> list[dict]:
        """Messages of a room, oldest first: the latest, those just before `before`, or the first after `after`."""

    @abc.abstractmethod
    async def create_account(self, username: str, password_hash: str) -> bool:
        """False when the username is taken (compared without regard to case)."""

    @abc.abstractmethod
    async def find_account(self, username: str) -> Account | None: ...

    @abc.abstractmethod
    async def revoke_session(self, sid: str, until: int) -> None:
        """Remember a revoked sid until its cookie would have expired anyway."""

    @abc.abstractmethod
    async def is_revoked(self, sid: str) -> bool: ...
