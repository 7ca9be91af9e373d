"""Rate limits shared by every chatd process through Redis.

Each check is one short Lua script, run atomically by Redis: read, decide and
write in one step, so two processes can never both spend the last token, and
one round trip per check. (Chosen over the `limits` library: it has no token
bucket with a fractional refill and `retry_after`, nor a "count first, forgive
on success" window; both fit in a dozen lines of Lua.) Time is Redis's own
clock (`TIME`), so the processes' clocks need not agree.

While Redis cannot be reached, each process falls back to its own in-memory
limits (logged once per outage): a looser limit for a while, but never none,
and never an error for the user.

Keys hold a SHA-256 of the session id, of the client address or of (username,
address), never the values themselves: session ids are secrets, addresses are
personal data and usernames are user input. Every key expires once it would
hold nothing a fresh one does not (a full bucket, a window gone by), so Redis
holds only what is in use.
"""

from __future__ import annotations

import hashlib
import json
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import (
    CHAT_BURST,
    CHAT_REFILL_PER_SECOND,
    GUEST_BURST,
    GUEST_REFILL_PER_SECOND,
    LOGIN_FAILURES_ALLOWED,
    LOGIN_WINDOW_SECONDS,
    ChatRateLimiter,
    LoginThrottle,
    NewIdentityLimiter,
)
from .memory import MemoryLoginThrottle, TokenBuckets

log = logging.getLogger("chatd.limits")

KEY_PREFIX = "chatd:"

# KEYS[1]: the bucket (tokens, updated). ARGV: burst, refill per second.
# Returns the seconds to wait, as a string (Lua numbers become integers otherwise).
TOKEN_BUCKET = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(saved[1]) or burst
local updated = tonumber(saved[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local wait = 0
if tokens >= 1 then
    tokens = tokens - 1
else
    wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'updated', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""

# KEYS[1]: the pair's failure count. ARGV: failures allowed, window seconds.
# Returns 0 (the attempt may go ahead, and now counts as failed) or the seconds left.
LOGIN_WINDOW = """
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
if failures >= tonumber(ARGV[1]) then
    return math.max(1, redis.call('TTL', KEYS[1]))
end
if redis.call('INCR', KEYS[1]) == 1 then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""


def _digest(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


class _Outage:
    """Logs the start and the end of a Redis outage, once each."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False

    def failed(self, exc: Exception) -> None:
        if not self.down:
            self.down = True
            log.warning("Redis unreachable (%s); %s uses this process's own limits meanwhile", exc, self.what)

    def ok(self) -> None:
        if self.down:
            self.down = False
            log.warning("Redis is back; %s is shared again", self.what)


class RedisTokenBuckets:
    """`TokenBuckets` shared through Redis: one hash per key under `KEY_PREFIX + kind`,
    spent by the TOKEN_BUCKET script; this process's own buckets while Redis is away."""

    def __init__(self, redis: Redis, kind: str, burst: int, per_second: float, what: str) -> None:
        self.prefix = KEY_PREFIX + kind + ":"
        self.burst = burst
        self.per_second = per_second
        self._take = redis.register_script(TOKEN_BUCKET)
        self._fallback = TokenBuckets(burst, per_second)
        self._outage = _Outage(what)

    async def take(self, key: str) -> float:
        if self.per_second <= 0:
            return 0.0  # switched off
        try:
            wait = float(await self._take(keys=[self.prefix + _digest(key)], args=[self.burst, repr(self.per_second)]))
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return self._fallback.take(key)
        self._outage.ok()
        return wait


class RedisChatRateLimiter(ChatRateLimiter):
    def __init__(self, redis: Redis, burst: int = CHAT_BURST, per_second: float = CHAT_REFILL_PER_SECOND) -> None:
        self.buckets = RedisTokenBuckets(redis, "chat", burst, per_second, "the chat limit")

    async def take(self, session_id: str) -> float:
        return await self.buckets.take(session_id)


class RedisNewIdentityLimiter(NewIdentityLimiter):
    def __init__(self, redis: Redis, burst: int = GUEST_BURST, per_second: float = GUEST_REFILL_PER_SECOND) -> None:
        self.buckets = RedisTokenBuckets(redis, "guest", burst, per_second, "the limit on new identities")

    async def take(self, address: str) -> float:
        return await self.buckets.take(address)


class RedisLoginThrottle(LoginThrottle):
    def __init__(
        self, redis: Redis, allowed: int = LOGIN_FAILURES_ALLOWED, window: int = LOGIN_WINDOW_SECONDS
    ) -> None:
        self.redis = redis
        self.allowed = allowed
        self.window = window
        self._attempt = redis.register_script(LOGIN_WINDOW)
        self._fallback = MemoryLoginThrottle(allowed, window)
        self._outage = _Outage("the login throttle")

    @staticmethod
    def _key(key: tuple[str, str]) -> str:
        return KEY_PREFIX + "login:" + _digest(*key)

    async def attempt(self, key: tuple[str, str]) -> int:
        try:
            wait = int(await self._attempt(keys=[self._key(key)], args=[self.allowed, self.window]))
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return await self._fallback.attempt(key)
        self._outage.ok()
        return wait

    async def succeeded(self, key: tuple[str, str]) -> None:
        await self._fallback.succeeded(key)
        try:
            await self.redis.delete(self._key(key))
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
