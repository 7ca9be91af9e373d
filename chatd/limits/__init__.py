"""Rate limits: chat messages per session, new identities per client address,
failed logins per (username, address).

Each lives behind a small interface so that a shared (Redis) version can replace
the in-process one when chatd runs as several processes. The first two are the
same token bucket, keyed differently.
"""

from __future__ import annotations

import abc
import math

# SPEC: a burst of 20 messages, refilled at 5 per second, per session.
CHAT_BURST = 20
CHAT_REFILL_PER_SECOND = 5.0

# SPEC: new identities (guest sessions, accounts) per client address: a burst of 60, refilled at 0.2 per second.
GUEST_BURST = 60
GUEST_REFILL_PER_SECOND = 0.2

# SPEC: 5 failed logins for one username from one address within 15 minutes.
LOGIN_FAILURES_ALLOWED = 5
LOGIN_WINDOW_SECONDS = 15 * 60

# Forget idle entries once there are this many, so memory stays bounded.
PRUNE_ABOVE = 10_000

# In-memory token buckets kept at most (full ones are forgotten sooner): past it the
# longest idle is forgotten, which only makes its key's limit looser, never stricter.
BUCKETS_KEPT = 100_000


class ChatRateLimiter(abc.ABC):
    @abc.abstractmethod
    async def take(self, session_id: str) -> float:
        """Spend one token. 0 when allowed, else the seconds until a token is back."""


class NewIdentityLimiter(abc.ABC):
    """New identities per client address: minting a guest session and registering an account.

    `--guest-rate 0` switches it off (`take` is then always 0).
    """

    @abc.abstractmethod
    async def take(self, address: str) -> float:
        """Spend one token of the address's bucket. 0 when allowed, else the seconds until a token is back."""


def retry_after(wait: float) -> int:
    """A `Retry-After` header's whole seconds for a wait: never 0, never early."""
    return max(1, math.ceil(wait))


class LoginThrottle(abc.ABC):
    """Failed logins per (username, client address).

    An attempt is counted as a failure *before* its password is checked, and
    forgiven by `succeeded`: so that many attempts sent at once cannot all pass
    the check while the first ones are still being hashed. (A shared version is
    an INCR with an expiry on first use.)
    """

    @abc.abstractmethod
    async def attempt(self, key: tuple[str, str]) -> int:
        """0 when a login may be tried (it now counts as failed), else the whole seconds left in the window."""

    @abc.abstractmethod
    async def succeeded(self, key: tuple[str, str]) -> None:
        """The attempt was right: forget the pair's failures."""
