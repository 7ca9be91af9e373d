"""One validation layer for every Socket.IO event: handlers receive clean values.

Precedence (SPEC): a payload that is not an object, a missing required field
or a field of the wrong JSON type is `invalid_request` (null counts as absent
for optional fields); then the value checks. Unknown fields are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .storage import DEFAULT_ROOM, HISTORY_DEFAULT, HISTORY_MAX

ROOM_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
DIRECT_RE = re.compile(r"@([a-z0-9_.-]{3,24})\+([a-z0-9_.-]{3,24})")  # both accounts, sorted, distinct
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MSG_MAX = 2000
# The largest id storage can hold (SQLite and PostgreSQL: signed 64 bits). A
# larger id is still a valid integer: it is clamped, so it pages back from the
# newest message (`before`) or finds nothing (`after`).
ID_MAX = 2**63 - 1


class EventError(Exception):
    """A client mistake, answered by ack or `chat_error`."""

    def __init__(self, code: str, message: str, **extra) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def _field(payload: dict, name: str, kind: type, *, required: bool):
    value = payload.get(name)
    if value is None:
        if required:
            raise EventError("invalid_request", f"'{name}' is required.")
        return None
    # bool is an int in Python, but not a number in JSON's sense here.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise EventError("invalid_request", f"'{name}' must be {_TYPE_WORDS[kind]}.")
    return value


_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def _object(payload) -> dict:
    if not isinstance(payload, dict):
        raise EventError("invalid_request", "The payload must be a JSON object.")
    return payload


def check_room(room: str) -> str:
    direct = DIRECT_RE.fullmatch(room)
    if direct is not None:
        if not direct.group(1) < direct.group(2):
            raise EventError("invalid_room", "A direct room names two different accounts in sorted order.")
        return room
    if not ROOM_RE.fullmatch(room):
        raise EventError(
            "invalid_room", "Room names are 1 to 32 of a-z, 0-9 and '-', starting with a letter or digit."
        )
    return room


def check_message(msg: str) -> str:
    text = msg.strip()
    if not 1 <= len(text) <= MSG_MAX:
        raise EventError("invalid_message", f"Messages are 1 to {MSG_MAX} characters.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError("invalid_message", "The message is not valid Unicode.") from None
    return text


@dataclass(frozen=True, slots=True)
class SendChat:
    room: str
    msg: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    room: str
    before: int | None
    after: int | None
    limit: int
    since: int | None = None


@dataclass(frozen=True, slots=True)
class MessageRef:
    """`edit chat` (with `msg`) and `delete chat` (without)."""

    room: str
    id: int
    msg: str | None = None


def parse_send_chat(payload) -> SendChat:
    payload = _object(payload)
    msg = _field(payload, "msg", str, required=True)
    room = _field(payload, "room", str, required=False)
    client_id = _field(payload, "client_id", str, required=False)
    if client_id is not None and not CLIENT_ID_RE.fullmatch(client_id):
        raise EventError("invalid_request", "'client_id' is 1 to 64 of A-Z, a-z, 0-9, '_' and '-'.")
    room = check_room(DEFAULT_ROOM if room is None else room)
    return SendChat(room=room, msg=check_message(msg), client_id=client_id)


def parse_message_ref(payload, *, with_msg: bool) -> MessageRef:
    payload = _object(payload)
    room = _field(payload, "room", str, required=True)
    id_ = _field(payload, "id", int, required=True)
    msg = _field(payload, "msg", str, required=with_msg) if with_msg else None
    room = check_room(room)
    return MessageRef(room=room, id=id_, msg=None if msg is None else check_message(msg))


def parse_room(payload) -> str:
    payload = _object(payload)
    return check_room(_field(payload, "room", str, required=True))


def parse_read(payload) -> tuple[str, int]:
    payload = _object(payload)
    room = _field(payload, "room", str, required=True)
    message_id = _field(payload, "id", int, required=True)
    room = check_room(room)
    if message_id <= 0:
        raise EventError("invalid_request", "Message ids are positive integers.")
    return room, min(message_id, ID_MAX)


def parse_history(payload) -> HistoryQuery:
    payload = _object(payload)
    room = _field(payload, "room", str, required=True)
    before = _field(payload, "before", int, required=False)
    after = _field(payload, "after", int, required=False)
    since = _field(payload, "since", int, required=False)
    limit = _field(payload, "limit", int, required=False)
    room = check_room(room)
    if before is not None and after is not None:
        raise EventError("invalid_request", "Give 'before' or 'after', not both.")
    if since is not None and (before is not None or after is not None):
        raise EventError("invalid_request", "Give 'since' alone, without 'before' or 'after'.")
    if any(v is not None and v <= 0 for v in (before, after)):
        raise EventError("invalid_request", "Message ids are positive integers.")
    if since is not None and since < 0:
        raise EventError("invalid_request", "'since' is a revision, 0 or more.")
    before = None if before is None else min(before, ID_MAX)
    after = None if after is None else min(after, ID_MAX)
    since = None if since is None else min(since, ID_MAX)
    if limit is None:
        limit = HISTORY_DEFAULT
    elif not 1 <= limit <= HISTORY_MAX:
        raise EventError("invalid_request", f"'limit' is 1 to {HISTORY_MAX}.")
    return HistoryQuery(room=room, before=before, after=after, limit=limit, since=since)


# -- the directory and moderation (moderation.py) ----------------------------------------

QUERY_MAX = 32  # SPEC: `rooms` `query`
DIRECTORY_DEFAULT = 50
TOPIC_MAX = 200  # SPEC: characters after trimming
MUTE_MAX = 86400  # seconds
MEMBER_ID_RE = CLIENT_ID_RE  # member ids: 1 to 64 URL-safe characters too


@dataclass(frozen=True, slots=True)
class Target:
    """Whom a moderator acts on: a guest session by member id, or an account by username."""

    room: str
    member: str | None
    username: str | None


def parse_directory(payload) -> tuple[str, int]:
    payload = _object(payload)
    query = _field(payload, "query", str, required=False) or ""
    limit = _field(payload, "limit", int, required=False)
    if len(query) > QUERY_MAX:
        raise EventError("invalid_request", f"'query' is at most {QUERY_MAX} characters.")
    if limit is None:
        limit = DIRECTORY_DEFAULT
    elif not 1 <= limit <= HISTORY_MAX:
        raise EventError("invalid_request", f"'limit' is 1 to {HISTORY_MAX}.")
    return query.strip().lower(), limit


def parse_topic(payload) -> tuple[str, str]:
    payload = _object(payload)
    room = _field(payload, "room", str, required=True)
    topic = _field(payload, "topic", str, required=True)
    room = check_room(room)
    topic = topic.strip()
    if len(topic) > TOPIC_MAX:
        raise EventError("invalid_request", f"A topic is at most {TOPIC_MAX} characters.")
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError("invalid_request", "The topic is not valid Unicode.") from None
    if "\x00" in topic:  # a topic is one line of text (and PostgreSQL text cannot hold U+0000)
        raise EventError("invalid_request", "The topic cannot hold U+0000.")
    return room, topic


def parse_moderator(payload) -> tuple[str, str, bool]:
    payload = _object(payload)
    room = _field(payload, "room", str, required=True)
    username = _field(payload, "username", str, required=True)
    on = _field(payload, "on", bool, required=True)
    return check_room(room), username, on


def parse_target(payload) -> Target:
    """`member` or `username`, exactly one of the two."""
    payload = _object(payload)
    room = _field(payload, "room", str, required=True)
    member = _field(payload, "member", str, required=False)
    username = _field(payload, "username", str, required=False)
    if (member is None) == (username is None):
        raise EventError("invalid_request", "Name exactly one of 'member' and 'username'.")
    return Target(room=check_room(room), member=member, username=username)


def parse_mute(payload) -> tuple[Target, int]:
    seconds = _field(_object(payload), "seconds", int, required=True)  # types before values
    target = parse_target(payload)
    if not 0 <= seconds <= MUTE_MAX:
        raise EventError("invalid_request", f"'seconds' is 0 to {MUTE_MAX}.")
    return target, seconds


def parse_ban(payload) -> tuple[Target, bool]:
    on = _field(_object(payload), "on", bool, required=True)  # types before values
    return parse_target(payload), on
