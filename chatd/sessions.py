"""The session cookie: one storage object and one decryption path for HTTP and Socket.IO.

aiohttp-session's `EncryptedCookieStorage` owns the cookie. `SessionCookieStorage`
adds two things to it: key rotation (cryptography's `MultiFernet`, wrapped so
the storage accepts it) and a reason for every cookie it rejects (`no_session`,
`invalid_session`, `expired`, `revoked`), which the Socket.IO handshake reports.

Both sides read a session the same way: `await read_session(request)`. On HTTP
that is the request itself; on Socket.IO it is the aiohttp request of the
Engine.IO handshake, found in the socket's environ.

Every session also has a public member id (what presence shows other people):
random, drawn when the session is issued and carried inside the encrypted
cookie, so every process reads the same id and nothing links it to the `sid`.
Cookies issued before member ids existed get a keyed hash of their `sid`
instead (see `fallback_member_id`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp_session
from aiohttp import web
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .storage import owner_key

COOKIE_NAME = "chatd_session"

# Why a cookie is no session; the handshake's `connect_error` carries these.
NO_SESSION = "no_session"
INVALID_SESSION = "invalid_session"
EXPIRED = "expired"
REVOKED = "revoked"

MEMBER_ID_CHARS = 16  # base64url characters: 96 bits
_MEMBER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a session is. Fixed when the session is issued."""

    sid: str
    name: str
    account: str | None
    expires_at: int
    member_id: str  # public, opaque; never the sid nor derived from it alone

    def member(self) -> dict:
        """The HTTP API's answer to register / log in / log out."""
        return {"name": self.name, "account": self.account}

    def presence_member(self) -> dict:
        """SPEC's Member: how presence shows this session to others."""
        return {"id": self.member_id, "name": self.name, "account": self.account}

    def public(self) -> dict:
        return {"name": self.name, "account": self.account, "expires_at": self.expires_at}

    @property
    def author(self) -> str:
        """The session's owner key (storage.owner_key): whose rooms and read markers these are,
        and who may edit and delete the messages it sends (SPEC) — its account, every session
        of it; a guest, this session only, by its public member id (never the sid)."""
        return owner_key(self.account, self.member_id)


# cryptography 51 made Fernet a native type that takes its key in `__new__`; before, it
# was a Python class that took it in `__init__`. RotatingFernet supports both.
_FERNET_KEYED_IN_NEW = Fernet.__new__ is not object.__new__


class RotatingFernet(Fernet):
    """A `Fernet` (so `EncryptedCookieStorage` accepts it) that behaves as a `MultiFernet`:
    the first key encrypts, every key decrypts."""

    def __new__(cls, keys: list[str] | tuple[str, ...]) -> RotatingFernet:
        return super().__new__(cls, keys[0]) if _FERNET_KEYED_IN_NEW else super().__new__(cls)

    def __init__(self, keys: list[str] | tuple[str, ...]) -> None:
        if not _FERNET_KEYED_IN_NEW:
            super().__init__(keys[0])
        self._multi = MultiFernet([Fernet(k) for k in keys])
        self._each = [(Fernet(k), _member_id_key(k)) for k in keys]

    def encrypt(self, data: bytes) -> bytes:
        return self._multi.encrypt(data)

    def decrypt(self, token: bytes | str, ttl: int | None = None) -> bytes:
        return self._multi.decrypt(token, ttl)

    def decrypt_with_member_key(self, token: bytes) -> tuple[bytes, bytes]:
        """Decrypt as `MultiFernet` does (each key in turn); also the member-id key of
        the key that opened the token."""
        for fernet, member_key in self._each:
            try:
                return fernet.decrypt(token), member_key
            except InvalidToken:
                continue
        raise InvalidToken


def _member_id_key(fernet_key: str) -> bytes:
    """A key for member-id hashes, derived from a Fernet key and used for nothing else."""
    return hmac.new(base64.urlsafe_b64decode(fernet_key), b"chatd member id v1", hashlib.sha256).digest()


def fallback_member_id(sid: str, member_key: bytes) -> str:
    """The member id of a cookie issued before member ids existed: HMAC-SHA256 of the sid
    under a key derived from the secret key that encrypted the cookie, so every process
    computes the same id and nobody without the key can link it to the sid."""
    digest = hmac.new(member_key, sid.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:MEMBER_ID_CHARS]


def new_member_id() -> str:
    return secrets.token_urlsafe(MEMBER_ID_CHARS * 3 // 4)


class ChatSession(aiohttp_session.Session):
    """An aiohttp-session `Session` that also says who it is, or why it is no session."""

    user: Identity | None = None
    rejected: str | None = None


IsRevoked = Callable[[str], Awaitable[bool]]


class SessionCookieStorage(EncryptedCookieStorage):
    def __init__(self, keys: tuple[str, ...], *, ttl: int, secure: bool, is_revoked: IsRevoked) -> None:
        # Ours, not the storage's: opening a cookie ourselves tells why it is no session.
        self.fernet = RotatingFernet(keys)
        super().__init__(
            self.fernet,
            cookie_name=COOKIE_NAME,
            max_age=ttl,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=True if secure else None,
            encoder=json.dumps,
            decoder=json.loads,
        )
        self._is_revoked = is_revoked

    @property
    def ttl(self) -> int:
        assert self.max_age is not None
        return self.max_age

    async def new_session(self) -> ChatSession:
        return ChatSession(None, data=None, new=True, max_age=self.max_age)

    async def load_session(self, request: web.Request) -> ChatSession:
        opened = self.open_cookie(self.load_cookie(request))
        if isinstance(opened, str):
            return self._rejected(opened)
        user, data = opened
        if await self._is_revoked(user.sid):
            return self._rejected(REVOKED)
        # max_age=None: the expiry written in the cookie is the only one that counts.
        session = ChatSession(None, data=data, new=False, max_age=None)
        session.user = user
        return session

    def open_cookie(self, token: str | None) -> tuple[Identity, dict] | str:
        """The cookie's identity and data, or why it is none: everything but revocation,
        which needs storage.

        The token is aiohttp-session's format, a Fernet token of
        `{"created": …, "session": {…}}` in JSON (the encoder and decoder passed
        to the storage above), opened here with our own keys."""
        if not token:
            return NO_SESSION
        try:
            # No Fernet ttl here: an expired cookie must be told apart from a forged one.
            plain, member_key = self.fernet.decrypt_with_member_key(token.encode("utf-8"))
            data = json.loads(plain.decode("utf-8"))
            user = _identity_from(data["session"], member_key)
        except (InvalidToken, ValueError, TypeError, KeyError, UnicodeError):
            return INVALID_SESSION
        if user.expires_at <= time.time():
            return EXPIRED
        return user, data

    def _rejected(self, reason: str) -> ChatSession:
        session = ChatSession(None, data=None, new=True, max_age=self.max_age)
        session.rejected = reason
        return session


def _identity_from(fields: dict, member_key: bytes) -> Identity:
    sid, name, account, exp = fields["sid"], fields["name"], fields["account"], fields["exp"]
    if not (isinstance(sid, str) and isinstance(name, str) and isinstance(exp, int)):
        raise TypeError("malformed session")
    if account is not None and not isinstance(account, str):
        raise TypeError("malformed session")
    member_id = fields.get("mid")
    if member_id is None:  # a cookie from before member ids
        member_id = fallback_member_id(sid, member_key)
    elif not (isinstance(member_id, str) and _MEMBER_ID_RE.fullmatch(member_id)):
        raise TypeError("malformed session")
    return Identity(sid=sid, name=name, account=account, expires_at=exp, member_id=member_id)


async def read_session(request: web.Request) -> ChatSession:
    """The request's session, decrypted and checked once per request."""
    session = await aiohttp_session.get_session(request)
    assert isinstance(session, ChatSession)
    return session


async def issue_session(request: web.Request, name: str, account: str | None) -> Identity:
    """Start a new session (new random sid) whose cookie goes out with this response."""
    session = await aiohttp_session.new_session(request)
    assert isinstance(session, ChatSession)
    storage: SessionCookieStorage = request[aiohttp_session.STORAGE_KEY]
    user = Identity(
        sid=secrets.token_urlsafe(24),  # 192 random bits
        name=name,
        account=account,
        expires_at=int(time.time()) + storage.ttl,
        member_id=new_member_id(),
    )
    session.update(
        {"sid": user.sid, "name": user.name, "account": user.account, "exp": user.expires_at, "mid": user.member_id}
    )
    session.user = user
    return user


def guest_name() -> str:
    return f"guest-{secrets.randbelow(10000):04d}"
