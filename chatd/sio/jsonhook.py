"""python-socketio's `json=` hook: orjson for speed, with the standard library where orjson refuses.

`JsonText` puts JSON encoded ahead (an online list presence keeps as text) into
a packet as it is, neither parsed nor re-encoded.
"""

from __future__ import annotations

import json
import re

import orjson


class OrjsonForSocketIO:
    """python-socketio's `json=` hook: orjson for speed.

    Both directions fall back to the standard library for what orjson refuses
    (a lone surrogate in a string, an integer beyond 64 bits): decoding, so
    that such a payload reaches validation and gets its error code instead of
    being dropped unanswered; encoding, so that an emit never raises. (The hook
    is python-socketio's class-wide `Packet.json`, so it also encodes for any
    Socket.IO client in the same process.)
    """

    @staticmethod
    def dumps(obj, **_kwargs) -> str:
        try:
            return orjson.dumps(obj, default=_as_fragment).decode("utf-8")
        except TypeError:  # orjson.JSONEncodeError included
            return json.dumps(obj, separators=(",", ":"), default=_as_parsed)

    @staticmethod
    def loads(text, **_kwargs):
        # orjson reads an integer beyond 64 bits as a float; the standard library
        # keeps it an integer, so such an id is the same type whatever else the
        # payload holds. Only a run of 19+ digits can be one.
        if not _LONG_DIGITS.search(text):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass
        return json.loads(text)


_LONG_DIGITS = re.compile(r"[0-9]{19}")


class JsonText:
    """JSON encoded ahead (an online list), put into a packet as it is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _as_fragment(obj):
    if isinstance(obj, JsonText):
        return orjson.Fragment(obj.text)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _as_parsed(obj):
    if isinstance(obj, JsonText):
        return json.loads(obj.text)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
