"""The typed keys under which the app and each request keep chatd's shared objects."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from .accounts import Accounts
from .config import Config
from .limits import LoginThrottle, NewIdentityLimiter
from .metrics import Metrics
from .realtime import Realtime
from .sessions import Identity
from .sio.managers import RedisClientManager
from .storage import Storage

CONFIG = web.AppKey("config", Config)
STORAGE = web.AppKey("storage", Storage)
ACCOUNTS = web.AppKey("accounts", Accounts)
LOGIN_THROTTLE = web.AppKey("login_throttle", LoginThrottle)
NEW_IDENTITIES = web.AppKey("new_identities", NewIdentityLimiter)
REALTIME = web.AppKey("realtime", Realtime)
METRICS = web.AppKey("metrics", Metrics)
REDIS = web.AppKey("redis", Redis)
CLIENT_MANAGER = web.AppKey("client_manager", RedisClientManager)

USER = web.RequestKey("user", Identity)
BODY = web.RequestKey("body", object)
