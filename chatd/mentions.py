"""`@username` in a message: the accounts it mentions, resolved when the message is stored.

SPEC: `@` at the start or after a character that is not a letter, digit, `_`, `.`
or `-`, then a username (matched without regard to case) of an account that
exists; canonical usernames, each once, in order of first appearance, at most 20.

Where SPEC is silent: the name runs as far as username characters go, and a
trailing `.` or `-` (punctuation such as "thanks @alice.") is dropped when the
whole run names no account.
"""

from __future__ import annotations

import re

from .storage import Storage

MAX_MENTIONS = 20
# Letters and digits here are ASCII (usernames are); the look-behind keeps "a@b" out.
_MENTION_RE = re.compile(r"(?<![A-Za-z0-9_.\-])@([A-Za-z0-9_.\-]{3,})")
MAX_CANDIDATES = 200  # a 2,000-character message holds at most ~500 `@x`s: one bounded lookup


def candidates(msg: str) -> list[list[str]]:
    """Per `@name` in order: the lower-cased names it may be (the whole run first)."""
    found = []
    for match in _MENTION_RE.finditer(msg):
        run = match.group(1).lower()
        names = [run] if len(run) <= 24 else []
        trimmed = run.rstrip(".-")
        if trimmed != run and 3 <= len(trimmed) <= 24:
            names.append(trimmed)
        if names:
            found.append(names)
        if len(found) >= MAX_CANDIDATES:
            break
    return found


async def resolve(storage: Storage, msg: str) -> list[str]:
    """The canonical usernames `msg` mentions (one storage query, none when there is no `@`)."""
    if "@" not in msg:
        return []
    options = candidates(msg)
    if not options:
        return []
    accounts = await storage.usernames(sorted({name for names in options for name in names}))
    mentioned: list[str] = []
    for names in options:
        name = next((accounts[n] for n in names if n in accounts), None)
        if name is not None and name not in mentioned:
            mentioned.append(name)
            if len(mentioned) == MAX_MENTIONS:
                break
    return mentioned
