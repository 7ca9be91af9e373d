"""Rate limits kept in this process."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from . import (
    BUCKETS_KEPT,
    CHAT_BURST,
    CHAT_REFILL_PER_SECOND,
    GUEST_BURST,
    GUEST_REFILL_PER_SECOND,
    LOGIN_FAILURES_ALLOWED,
    LOGIN_WINDOW_SECONDS,
    PRUNE_ABOVE,
    ChatRateLimiter,
    LoginThrottle,
    NewIdentityLimiter,
)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per key: a burst of `burst`, refilled at `per_second`.

    Kept in the order of their last use, oldest first, so that forgetting is
    cheap: a bucket idle long enough to be full again is the same as none, and
    past `kept` buckets the longest idle goes (its key then starts full again:
    a looser limit for it, never a stricter one). Memory stays bounded whatever
    the number of keys.
    """

    def __init__(self, burst: int, per_second: float, kept: int = BUCKETS_KEPT) -> None:
        self.burst = burst
        self.per_second = per_second
        self.kept = kept
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when a token was spent, else the seconds until one is back. `per_second` 0: no limit."""
        if self.per_second <= 0:
            return 0.0
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._forget(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            self._buckets.move_to_end(key)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.per_second)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.per_second

    def _forget(self, now: float) -> None:
        full_after = self.burst / self.per_second
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < full_after and len(self._buckets) < self.kept:
                break
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class MemoryChatRateLimiter(ChatRateLimiter):
    def __init__(self, burst: int = CHAT_BURST, per_second: float = CHAT_REFILL_PER_SECOND) -> None:
        self.buckets = TokenBuckets(burst, per_second)

    async def take(self, session_id: str) -> float:
        return self.buckets.take(session_id)  # --chat-rate 0: no chat limit


class MemoryNewIdentityLimiter(NewIdentityLimiter):
    def __init__(self, burst: int = GUEST_BURST, per_second: float = GUEST_REFILL_PER_SECOND) -> None:
        self.buckets = TokenBuckets(burst, per_second)

    async def take(self, address: str) -> float:
        return self.buckets.take(address)  # --guest-rate 0: no limit


@dataclass(slots=True)
class _Window:
    started: float
    failures: int


class MemoryLoginThrottle(LoginThrottle):
    def __init__(self, allowed: int = LOGIN_FAILURES_ALLOWED, window: float = LOGIN_WINDOW_SECONDS) -> None:
        self.allowed = allowed
        self.window = window
        self._windows: dict[tuple[str, str], _Window] = {}

    def _current(self, key: tuple[str, str], now: float) -> _Window | None:
        entry = self._windows.get(key)
        if entry is not None and now - entry.started >= self.window:
            del self._windows[key]
            return None
        return entry

    async def attempt(self, key: tuple[str, str]) -> int:
        now = time.monotonic()
        entry = self._current(key, now)
        if entry is None:
            if len(self._windows) >= PRUNE_ABOVE:
                self._windows = {k: w for k, w in self._windows.items() if now - w.started < self.window}
            self._windows[key] = _Window(now, 1)
            return 0
        if entry.failures >= self.allowed:
            return max(1, math.ceil(entry.started + self.window - now))
        entry.failures += 1
        return 0

    async def succeeded(self, key: tuple[str, str]) -> None:
        self._windows.pop(key, None)
