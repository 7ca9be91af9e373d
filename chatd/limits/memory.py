"""Rate limits kept in this process."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from . import (
    CHAT_BURST,
    CHAT_REFILL_PER_SECOND,
    LOGIN_FAILURES_ALLOWED,
    LOGIN_WINDOW_SECONDS,
    PRUNE_ABOVE,
    ChatRateLimiter,
    LoginThrottle,
)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class MemoryChatRateLimiter(ChatRateLimiter):
    def __init__(self, burst: int = CHAT_BURST, per_second: float = CHAT_REFILL_PER_SECOND) -> None:
        self.burst = burst
        self.per_second = per_second
        self._buckets: dict[str, _Bucket] = {}

    async def take(self, session_id: str) -> float:
        if self.per_second <= 0:
            return 0.0  # --chat-rate 0: no chat limit
        now = time.monotonic()
        bucket = self._buckets.get(session_id)
        if bucket is None:
            if len(self._buckets) >= PRUNE_ABOVE:
                self._prune(now)
            bucket = self._buckets[session_id] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.per_second)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.per_second

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.per_second
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < full_after}


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
