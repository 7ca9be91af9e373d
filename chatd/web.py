"""The aiohttp app: sessions, the JSON API, the page and its static files.

`create_app(config)` builds everything; shared objects hang off the app under
typed `web.AppKey`s. The session cookie is aiohttp-session's
`EncryptedCookieStorage` (see `sessions.py`); the Socket.IO server from
`realtime.py` is attached to this same app and reads the same cookie.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import logging
import warnings
from pathlib import Path
from typing import AsyncIterator

import aiohttp_session
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .accounts import Accounts, password_problem, username_problem
from .config import Config, ConfigError
from .config import origin_allowed as config_origin_allowed
from .forwarded import TrustedProxies
from .handshake_gate import HandshakeGate
from .fanout import RedisClientManager, redis_address
from .limits import ChatRateLimiter, LoginThrottle, NewIdentityLimiter, retry_after
from .limits.memory import MemoryChatRateLimiter, MemoryLoginThrottle, MemoryNewIdentityLimiter
from .limits.redis import RedisChatRateLimiter, RedisLoginThrottle, RedisNewIdentityLimiter
from .metrics import Metrics
from .presence.memory import MemoryPresence
from .presence.redis import RedisPresence
from .realtime import Realtime
from .sessions import Identity, SessionCookieStorage, guest_name, issue_session, read_session
from .storage import OUTAGE_RETRY_AFTER, Storage, StorageError
from .storage.postgres import PostgresStorage
from .storage.sqlite import SqliteStorage

# aiohttp-session 2.12 stores itself on the request under plain string keys.
warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module=r"aiohttp_session")

log = logging.getLogger("chatd.web")



def _public_dir() -> Path:
    """The page's files, inside the installed package (public/ in a checkout, through the chatd/public link)."""
    files = importlib.resources.files("chatd") / "public"
    # Editable installs, wheels and shiv's unpacked zipapp are all real folders,
    # which aiohttp's static route needs.
    if not isinstance(files, Path) or not files.is_dir():
        raise RuntimeError(f"chatd's page is missing from the installed package ({files})")
    return files


PUBLIC_DIR = _public_dir()
MAX_BODY_BYTES = 16 * 1024

CONFIG = web.AppKey("config", Config)
STORAGE = web.AppKey("storage", Storage)
ACCOUNTS = web.AppKey("accounts", Accounts)
LOGIN_THROTTLE = web.AppKey("login_throttle", LoginThrottle)
NEW_IDENTITIES = web.AppKey("new_identities", NewIdentityLimiter)
REALTIME = web.AppKey("realtime", Realtime)
METRICS = web.AppKey("metrics", Metrics)
REDIS = web.AppKey("redis", Redis)
CLIENT_MANAGER = web.AppKey("client_manager", RedisClientManager)
HANDSHAKE_GATE = web.AppKey("handshake_gate", HandshakeGate)

USER = web.RequestKey("user", Identity)
BODY = web.RequestKey("body", object)

# Served with every response: no inline script, nothing from other origins.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class ApiError(Exception):
    """An error answer of SPEC's shape: {"error": code, "message": sentence}."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> web.Response:
        return web.json_response(
            {"error": self.code, "message": self.message}, status=self.status, headers=self.headers
        )


# -- origins ------------------------------------------------------------------


def own_origin(request: web.Request) -> str:
    # The scheme is X-Forwarded-Proto's behind a --trusted-proxy (forwarded.py); the host is always Host.
    return f"{request.scheme}://{request.host}"


def origin_allowed(origin: str | None, request: web.Request) -> bool:
    return config_origin_allowed(origin, own_origin(request), request.app[CONFIG].allow_origins)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


# -- middlewares, outermost first ---------------------------------------------


@web.middleware
async def storage_outage(request: web.Request, handler) -> web.StreamResponse:
    """Storage that cannot answer (a database gone away) is a 503 in SPEC's shape, never a 500.

    Outermost but for the proxy middleware: reading the session cookie already
    asks storage whether the session was revoked.
    """
    try:
        return await handler(request)
    except StorageError:
        log.warning("storage is unreachable; answering 503")
        message = "chatd cannot reach its storage; try again shortly."
        return ApiError(503, "unavailable", message, {"Retry-After": str(OUTAGE_RETRY_AFTER)}).response()


@web.middleware
async def api_errors(request: web.Request, handler) -> web.StreamResponse:
    """ApiError becomes SPEC's JSON error; on /api/*, so do aiohttp's own 404/405."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if not is_api(request) or exc.status < 400:
            raise
        return _api_error_for(request, exc).response()


def _api_error_for(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own errors on /api/*, in SPEC's shape (only `Allow` of their headers matters)."""
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return ApiError(
            405, "method_not_allowed", f"{request.path} does not take {request.method}; use {allow}.", {"Allow": allow}
        )
    if exc.status == 404:
        return ApiError(404, "not_found", f"There is no API route {request.path}.")
    return ApiError(exc.status, "http_error", exc.reason)


@web.middleware
async def cors(request: web.Request, handler) -> web.StreamResponse:
    """CORS with credentials for --allow-origin origins only, never `*`."""
    origin = request.headers.get("Origin")
    foreign_but_allowed = origin is not None and origin != own_origin(request) and origin_allowed(origin, request)
    if request.method == "OPTIONS" and is_api(request) and origin is not None:
        if not foreign_but_allowed:
            return ApiError(403, "forbidden_origin", "This origin may not call chatd's API.").response()
        response: web.StreamResponse = web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            },
        )
    else:
        response = await handler(request)
    if foreign_but_allowed and is_api(request):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers.add("Vary", "Origin")
    return response


@web.middleware
async def post_hygiene(request: web.Request, handler) -> web.StreamResponse:
    """Every POST: an allowed Origin, a JSON content type, a small body that parses."""
    if request.method != "POST" or not is_api(request) or request.match_info.http_exception is not None:
        return await handler(request)  # not ours, or the router's 404/405 comes first
    if not origin_allowed(request.headers.get("Origin"), request):
        raise ApiError(403, "forbidden_origin", "This origin may not call chatd's API.")
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the body as Content-Type: application/json.")
    request[BODY] = _parse_json(await _read_body(request))
    return await handler(request)


async def _read_body(request: web.Request) -> bytes:
    too_large = ApiError(413, "payload_too_large", f"Request bodies are at most {MAX_BODY_BYTES} bytes.")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    while chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _parse_json(body: bytes) -> object:
    if not body.strip():
        return None  # an empty body; handlers that need one say invalid_request
    try:
        # parse_constant: Python's json reads NaN and Infinity, which JSON has not.
        return json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
    except RecursionError:
        # Valid JSON nested deeper than Python parses; no request of ours has that shape.
        raise ApiError(400, "invalid_request", "The body is nested too deeply.") from None


@web.middleware
async def ensure_session(request: web.Request, handler) -> web.StreamResponse:
    """The page and every /api/* route run with a valid session: a new guest one if need be."""
    if request.path == "/" or is_api(request):
        session = await read_session(request)
        if session.user is None:
            try:
                await draw_new_identity(request)
            except ApiError as refused:  # answered before a session is issued: no cookie
                return refused.response() if is_api(request) else _too_many_page(refused)
        request[USER] = session.user or await issue_session(request, guest_name(), None)
    return await handler(request)


async def draw_new_identity(request: web.Request) -> None:
    """A guest session or an account: one token of the client address's bucket, else 429 (limits/)."""
    # request.remote is the forwarded client address behind a --trusted-proxy (forwarded.py).
    wait = await request.app[NEW_IDENTITIES].take(request.remote or "")
    if wait:
        message = "Too many new sessions from your address; try again later."
        raise ApiError(429, "too_many_requests", message, {"Retry-After": str(retry_after(wait))})


def _too_many_page(refused: ApiError) -> web.Response:
    page = f"<!doctype html><meta charset=utf-8><title>chatd</title><p>{refused.message}</p>\n"
    return web.Response(text=page, content_type="text/html", status=refused.status, headers=refused.headers)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


# -- handlers -----------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    # A plain Response, not a FileResponse: aiohttp-session only sets cookies on
    # the former, and the first page view must carry the guest cookie.
    page = await asyncio.to_thread((PUBLIC_DIR / "index.html").read_bytes)
    return web.Response(body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})


async def get_session_info(request: web.Request) -> web.Response:
    return web.json_response(request[USER].public())


def _credentials(request: web.Request) -> tuple[str, str]:
    body = request[BODY]
    if not (
        isinstance(body, dict) and isinstance(body.get("username"), str) and isinstance(body.get("password"), str)
    ):
        raise ApiError(400, "invalid_request", "Send {\"username\": string, \"password\": string}.")
    return body["username"], body["password"]


async def _switch_session(request: web.Request, name: str, account: str | None, reason: str) -> Identity:
    """Revoke the request's session (if the client already had it) and issue a new one.

    A new sid every time: no session fixation. The old session's sockets, on
    every process, get `session_ended` and are disconnected.
    """
    current = await read_session(request)
    old = None if current.new else current.user
    user = await issue_session(request, name, account)
    if old is not None:
        await request.app[STORAGE].revoke_session(old.sid, old.expires_at)
        await request.app[REALTIME].end_session(old.sid, reason)
    return user


async def register(request: web.Request) -> web.Response:
    username, password = _credentials(request)
    problem = username_problem(username) or password_problem(password)
    if problem:
        raise ApiError(400, "invalid_request", problem)
    if not (await read_session(request)).new:  # else the guest session this request was given has drawn already
        await draw_new_identity(request)
    if not await request.app[ACCOUNTS].register(username, password):
        raise ApiError(409, "username_taken", "That username is taken.")
    user = await _switch_session(request, username, username, "login")
    return web.json_response(user.member(), status=201)


async def login(request: web.Request) -> web.Response:
    username, password = _credentials(request)
    throttle = request.app[LOGIN_THROTTLE]
    # request.remote is the forwarded client address behind a --trusted-proxy (forwarded.py).
    key = (username.lower(), request.remote or "")
    # Counted as failed before the (slow) check, so parallel attempts cannot outrun the limit.
    wait = await throttle.attempt(key)
    if wait:
        raise ApiError(
            429, "too_many_attempts", "Too many failed logins; try again later.", headers={"Retry-After": str(wait)}
        )
    account = await request.app[ACCOUNTS].verify(username, password)
    if account is None:
        raise ApiError(401, "invalid_credentials", "Wrong username or password.")
    await throttle.succeeded(key)
    user = await _switch_session(request, account, account, "login")
    return web.json_response(user.member())


async def logout(request: web.Request) -> web.Response:
    if request[BODY] is not None and not isinstance(request[BODY], dict):
        raise ApiError(400, "invalid_request", "Send {} or an empty body.")
    user = await _switch_session(request, guest_name(), None, "logout")
    return web.json_response(user.member())


async def metrics_page(request: web.Request) -> web.Response:
    body = await request.app[METRICS].exposition(*request.app[REALTIME].online_counts())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[STORAGE].ping()
    except StorageError:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok"})


# -- the app ------------------------------------------------------------------


def create_app(config: Config, *, storage: Storage | None = None) -> web.Application:
    if storage is None:
        storage = PostgresStorage(config.database_url) if config.database_url else SqliteStorage(config.database_path)
    metrics = Metrics()
    if config.metrics:
        storage = metrics.timed(storage)  # the storage latency histogram
    session_storage = SessionCookieStorage(
        config.secret_keys, ttl=config.session_ttl, secure=config.secure_cookie, is_revoked=storage.is_revoked
    )
    app = web.Application(
        # Outermost first. Errors are answered inside the session middleware,
        # so that even an error response carries the guest session it issued.
        middlewares=[
            *([TrustedProxies(config.trusted_proxies).middleware] if config.trusted_proxies else []),
            storage_outage,
            cors,
            aiohttp_session.session_middleware(session_storage),
            ensure_session,
            api_errors,
            post_hygiene,
        ]
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STORAGE] = storage
    app[ACCOUNTS] = Accounts(storage)
    # One process keeps its limits and presence in memory; several share them, and their broadcasts, through Redis.
    rate_limiter: ChatRateLimiter
    client_manager = None
    presence = MemoryPresence
    if config.redis_url:
        app[REDIS] = Redis.from_url(config.redis_url)
        app[CLIENT_MANAGER] = client_manager = RedisClientManager(config.redis_url)
        presence = functools.partial(RedisPresence, redis=app[REDIS])
        rate_limiter = RedisChatRateLimiter(app[REDIS], config.chat_burst, config.chat_rate)
        app[LOGIN_THROTTLE] = RedisLoginThrottle(app[REDIS])
        app[NEW_IDENTITIES] = RedisNewIdentityLimiter(app[REDIS], config.guest_burst, config.guest_rate)
        app.cleanup_ctx.append(_redis_lifetime)
    else:
        rate_limiter = MemoryChatRateLimiter(config.chat_burst, config.chat_rate)
        app[LOGIN_THROTTLE] = MemoryLoginThrottle()
        app[NEW_IDENTITIES] = MemoryNewIdentityLimiter(config.guest_burst, config.guest_rate)
    app[REALTIME] = Realtime(
        storage=storage,
        presence=presence,
        rate_limiter=rate_limiter,
        origin_allowed=functools.partial(_socket_origin_allowed, metrics),
        metrics=metrics,
        client_manager=client_manager,
        websocket_compression=config.websocket_compression,
    )

    # Handshakes that can only be refused are answered before aiohttp (handshake_gate.py),
    # except where aiohttp must see every request: proxy headers to check, access logs.
    if not config.trusted_proxies and config.log_level != "debug":
        app[HANDSHAKE_GATE] = HandshakeGate(
            session_storage, app[REALTIME].sio.eio, app[REALTIME].refusal, SECURITY_HEADERS, config.allow_origins
        )

    app.router.add_get("/", index)
    app.router.add_get("/api/session", get_session_info)
    app.router.add_post("/api/register", register)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_get("/healthz", healthz)
    if config.metrics:
        app.router.add_get("/metrics", metrics_page)
    app.router.add_static("/static/", PUBLIC_DIR)
    app[REALTIME].attach(app)

    app.on_response_prepare.append(add_security_headers)
    app.cleanup_ctx.append(_storage_lifetime)
    app.on_shutdown.append(_close_sockets)
    return app


def _socket_origin_allowed(metrics: Metrics, origin: str | None, request: web.Request) -> bool:
    """Engine.IO's origin check, counting refusals as refused handshakes."""
    if origin_allowed(origin, request):
        return True
    metrics.handshake_refused("forbidden_origin")
    return False


async def _storage_lifetime(app: web.Application) -> AsyncIterator[None]:
    await app[STORAGE].open()
    await app[ACCOUNTS].warm_up()
    yield
    app[ACCOUNTS].close()
    await app[STORAGE].close()


async def _redis_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Reach Redis before serving (else a clear start-up error), and hear the other processes from the start."""
    address = redis_address(app[CONFIG].redis_url or "")
    try:
        await app[REDIS].ping()
        await app[CLIENT_MANAGER].start()
        await app[REALTIME].presence.start()
    except (RedisError, OSError) as exc:
        await app[CLIENT_MANAGER].close()
        await app[REDIS].aclose()
        raise ConfigError(f"cannot reach Redis at {address}: {exc}") from None
    yield
    await app[CLIENT_MANAGER].close()
    await app[REDIS].aclose()


async def _close_sockets(app: web.Application) -> None:
    if HANDSHAKE_GATE in app:
        app[HANDSHAKE_GATE].close_all()
    await app[REALTIME].close_all()
