"""The aiohttp app: `create_app(config)` wires everything, and the routes are listed here.

Shared objects hang off the app under typed `web.AppKey`s (keys.py). The
session cookie is aiohttp-session's `EncryptedCookieStorage` (sessions.py); the
Socket.IO server (realtime.py) is attached to this same app and reads the same
cookie. One process keeps its limits and presence in memory; several share
them, and their broadcasts, through Redis.
"""

from __future__ import annotations

import functools
import warnings
from typing import AsyncIterator

import aiohttp_session
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import http_api
from .accounts import Accounts
from .config import Config, ConfigError
from .forwarded import TrustedProxies
from .keys import (
    ACCOUNTS,
    BODY,
    CLIENT_MANAGER,
    CONFIG,
    LOGIN_THROTTLE,
    METRICS,
    NEW_IDENTITIES,
    REALTIME,
    REDIS,
    STORAGE,
    USER,
)
from .limits import ChatRateLimiter
from .limits.memory import MemoryChatRateLimiter, MemoryLoginThrottle, MemoryNewIdentityLimiter
from .limits.redis import RedisChatRateLimiter, RedisLoginThrottle, RedisNewIdentityLimiter
from .metrics import Metrics
from .middlewares import (
    add_security_headers,
    api_errors,
    cors,
    ensure_session,
    origin_allowed,
    post_hygiene,
    storage_outage,
)
from .presence.memory import MemoryPresence
from .presence.redis import RedisPresence
from .realtime import Realtime
from .sessions import SessionCookieStorage
from .sio.managers import RedisClientManager, redis_address
from .tasks import TaskOwner
from .storage import Storage, prune_client_ids_forever
from .storage.postgres import PostgresStorage
from .storage.sqlite import SqliteStorage

# aiohttp-session 2.12 stores itself on the request under plain string keys.
warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module=r"aiohttp_session")

__all__ = [
    "ACCOUNTS", "BODY", "CLIENT_MANAGER", "CONFIG", "LOGIN_THROTTLE", "METRICS", "NEW_IDENTITIES", "REALTIME",
    "REDIS", "STORAGE", "USER", "create_app",
]  # fmt: skip


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
        operators=config.operators,
    )

    app.router.add_get("/", http_api.index)
    app.router.add_get("/api/session", http_api.get_session_info)
    app.router.add_post("/api/register", http_api.register)
    app.router.add_post("/api/login", http_api.login)
    app.router.add_post("/api/logout", http_api.logout)
    app.router.add_get("/healthz", http_api.healthz)
    if config.metrics:
        app.router.add_get("/metrics", http_api.metrics_page)
    app.router.add_static("/static/", http_api.PUBLIC_DIR)
    app[REALTIME].attach(app)  # /socket.io/

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
    housekeeping = TaskOwner("storage housekeeping")
    housekeeping.spawn(prune_client_ids_forever(app[STORAGE]))
    yield
    await housekeeping.close()
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
    await app[REALTIME].close_all()
