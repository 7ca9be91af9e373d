"""Input that cannot hurt the server (issue 4, acceptance 5).

A hypothesis property test throws random payloads of every JSON type at every
event, with and without an ack, at one real chatd, and checks each answer
against a small model of SPEC's rules; meanwhile an unrelated client in
`general` must keep chatting and never hear of it. A few hand-written frames
cover what a well-behaved client library cannot send.

Hypothesis runs in a worker thread and hands each example to the test's
running event loop (`run_coroutine_threadsafe`), so one server and its clients
serve every example, and a failing example is still shrunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import string

import aiohttp
import pytest
import socketio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import RawSocket, SocketClient, Visitor

pytestmark = pytest.mark.storage

EVENTS = ["send chat", "join", "leave", "history", "read", "typing"]
KNOWN_ERRORS = {"invalid_request", "invalid_message", "invalid_room", "not_in_room", "too_many_rooms"}
ROOM_CHARS = set(string.ascii_lowercase + string.digits + "-")
EXAMPLES = 400
SENDS_PER_SESSION = 18  # under the burst of 20: the fuzzing client is never rate limited


# -- what SPEC says the answer must be ------------------------------------------------


def wire(payload):
    """The payload as the server must read it: the client's encoding, read back as standard JSON.

    (The client encodes with python-socketio's class-wide `Packet.json`; a surrogate
    pair written as two escapes comes back as one character.)"""
    encoded = socketio.packet.Packet.json.dumps(["e", payload], separators=(",", ":"))
    return json.loads(encoded)[1]


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_room(room: str) -> bool:
    return 1 <= len(room) <= 32 and set(room) <= ROOM_CHARS and room[0] != "-"


def valid_text(text: str) -> bool:
    return 1 <= len(text) <= 2000 and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


FIELDS = {
    "send chat": [("msg", str, True), ("room", str, False)],
    "join": [("room", str, True)],
    "leave": [("room", str, True)],
    "history": [
        ("room", str, True), ("before", int, False), ("after", int, False), ("since", int, False), ("limit", int, False)
    ],
    "read": [("room", str, True), ("id", int, True)],
    "typing": [("room", str, True)],
}


def expected(event: str, payload, joined: set[str]) -> set[str]:
    """The acceptable outcomes: {"ok"} or the error codes SPEC allows (any of several value errors)."""
    if not isinstance(payload, dict):
        return {"invalid_request"}
    for name, kind, required in FIELDS[event]:
        value = payload.get(name)
        if value is None:
            if required:
                return {"invalid_request"}
        elif not (isinstance(value, str) if kind is str else is_int(value)):
            return {"invalid_request"}
    room = "general" if payload.get("room") is None else payload["room"]
    value_errors = set()
    if not valid_room(room):
        value_errors.add("invalid_room")
    if event == "send chat" and not valid_text(payload["msg"].strip()):
        value_errors.add("invalid_message")
    if event == "history":
        before, after, since, limit = (payload.get(k) for k in ("before", "after", "since", "limit"))
        if (before is not None and after is not None) or any(v is not None and v <= 0 for v in (before, after)):
            value_errors.add("invalid_request")
        if since is not None and (since < 0 or before is not None or after is not None):
            value_errors.add("invalid_request")
        if limit is not None and not 1 <= limit <= 100:
            value_errors.add("invalid_request")
    if event == "read" and payload["id"] <= 0:
        value_errors.add("invalid_request")
    if value_errors:
        return value_errors
    if event != "join" and room not in joined:
        return {"not_in_room"}
    if event == "join" and room not in joined and len(joined) >= 50:
        return {"too_many_rooms"}
    return {"ok"}


def expected_history(ids: list[int], payload: dict) -> list[int]:
    limit = payload.get("limit") or 50
    if payload.get("since") is not None:  # only sends here, so every message's rev is its id
        return [i for i in ids if i > payload["since"]][:limit]
    if payload.get("after") is not None:
        return [i for i in ids if i > payload["after"]][:limit]
    if payload.get("before") is not None:
        return [i for i in ids if i < payload["before"]][-limit:]
    return ids[-limit:]


# -- random payloads ---------------------------------------------------------------------

# hypothesis never draws surrogates from characters(); mix them in by hand.
any_char = st.characters() | st.integers(0xD800, 0xDFFF).map(chr) | st.sampled_from(" \t\n\r\x00\u2028\ufeff")
any_text = st.lists(any_char, max_size=12).map("".join)
big_ints = st.integers(min_value=2**62, max_value=2**80) | st.integers(min_value=-(2**80), max_value=-(2**62))
scalars = st.none() | st.booleans() | st.integers() | big_ints | st.floats() | any_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text | st.sampled_from(sorted(FIELDS)), inner, max_size=4),
    max_leaves=12,
)


def mostly(usual: st.SearchStrategy, other: st.SearchStrategy, tenths: int = 7) -> st.SearchStrategy:
    """`usual` about `tenths` times in ten, else `other` (one_of does not weigh its branches)."""
    return st.integers(0, 9).flatmap(lambda n: usual if n < tenths else other)


# Valid-looking values are drawn more often than the rest, so that success paths
# and the state they change are well exercised too.
few_rooms = st.sampled_from(["general", "fuzz", "fuzz-2"])
room_names = mostly(
    few_rooms,
    st.one_of(
        st.sampled_from(["a" * 32, "a" * 33, "General", "-x", "abc\n", "", "fuzz\n", " fuzz"]),
        st.from_regex(r"[a-z0-9][a-z0-9-]{0,31}", fullmatch=True),
        any_text,
    ),
    tenths=6,
)
messages = mostly(
    st.text(min_size=1, max_size=40),
    st.one_of(
        any_text,
        st.tuples(st.integers(1995, 2005), st.sampled_from(["", " ", "\n\t "])).map(
            lambda t: t[1] + "m" * t[0] + t[1]
        ),
    ),
)
ids = st.integers(min_value=-3, max_value=400) | big_ints
field_values = {
    "msg": mostly(messages, json_values, tenths=8),
    "room": mostly(room_names, json_values, tenths=8),
    "before": mostly(ids, json_values),
    "after": mostly(ids, json_values),
    "since": mostly(ids, json_values, tenths=4),
    "limit": mostly(st.integers(min_value=-1, max_value=102), json_values),
    "id": mostly(ids, json_values),
}


def shaped_for(event: str) -> st.SearchStrategy:
    """Objects with the event's own fields (required ones usually present), others at random, unknown extras."""
    own = {name for name, _, _ in FIELDS[event]}
    required = {name: field_values[name] for name, _, needed in FIELDS[event] if needed}
    optional = {name: values for name, values in field_values.items() if name not in required}
    shaped = st.tuples(
        st.fixed_dictionaries(required, optional=optional),
        st.dictionaries(any_text, json_values, max_size=2),
    ).map(lambda parts: {**parts[1], **parts[0]})
    # Now and then without a required field, or with the other events' fields only.
    loose = st.fixed_dictionaries({}, optional={k: v for k, v in field_values.items() if k not in own or k in optional})
    return mostly(shaped, loose, tenths=9)


with_ack = mostly(st.just(True), st.just(False), tenths=5)
steps = mostly(
    st.one_of(*(st.tuples(st.just(event), shaped_for(event), with_ack) for event in EVENTS)),
    st.tuples(st.sampled_from(EVENTS), json_values, with_ack),
    tenths=8,
)


# -- the harness ---------------------------------------------------------------------------


class Fuzzing:
    """One chatd, a fuzzing client (its session replaced before the rate limit bites) and a bystander."""

    def __init__(self, make_visitor, base_url: str) -> None:
        self.make_visitor = make_visitor
        self.base_url = base_url
        self.room_ids: dict[str, list[int]] = {}  # every message in the server, per room
        self.examples = 0
        self.outcomes: dict[tuple[str, str, bool], int] = {}

    async def start(self) -> None:
        self.bystander_visitor: Visitor = await self.make_visitor()
        self.bystander: SocketClient = await self.bystander_visitor.socket()
        self.bystander_name = (await self.bystander.next("welcome"))["name"]
        await self.new_session()

    async def new_session(self) -> None:
        self.visitor: Visitor = await self.make_visitor()
        self.client: SocketClient = await self.visitor.socket()
        welcome = await self.client.next("welcome")
        self.me = {"id": welcome["id"], "name": welcome["name"], "account": None}
        self.joined = {"general"}
        self.sends = 0

    async def check(self, event: str, payload, with_ack: bool) -> None:
        self.examples += 1
        if self.sends >= SENDS_PER_SESSION:
            await self.visitor.close()
            await self.new_session()
        seen = wire(payload)
        outcome = expected(event, seen, self.joined)
        if event == "send chat" and outcome == {"ok"}:
            self.sends += 1
        if with_ack:
            ack = await self.client.call(event, payload, timeout=5)
            await self.check_ack(event, seen, outcome, ack)
        else:
            await self.client.emit(event, payload)
            await self.check_silent(event, seen, outcome)
        key = (event, "ok" if outcome == {"ok"} else "error", with_ack)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        assert self.client.sio.connected
        if self.examples % 25 == 0:
            await self.bystander_still_chats()

    async def check_ack(self, event: str, payload, outcome: set[str], ack) -> None:
        assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool), ack
        if not ack["ok"]:
            assert set(ack) == {"ok", "error", "message"}, ack
            assert ack["error"] in KNOWN_ERRORS and isinstance(ack["message"], str) and ack["message"], ack
            assert ack["error"] in outcome, (outcome, ack)
            return
        assert outcome == {"ok"}, (outcome, ack)
        room = "general" if payload.get("room") is None else payload["room"]
        if event == "send chat":
            assert set(ack) == {"ok", "id", "rev"} and is_int(ack["id"]) and is_int(ack["rev"]), ack
            await self.delivered(ack["id"], room, payload["msg"].strip())
        elif event == "join":
            fields = {"ok", "room", "topic", "history", "online", "online_count", "last_id", "read_id", "unread", "mentions"}
            assert set(ack) == fields and ack["room"] == room, ack
            assert ack["online_count"] == len(ack["online"]) and ack["read_id"] <= ack["last_id"], ack
            assert [m["id"] for m in ack["history"]] == self.room_ids.get(room, [])[-50:]
            assert self.me in ack["online"]
            keys = [(m["name"].casefold(), m["id"]) for m in ack["online"]]
            assert keys == sorted(keys) and len({m["id"] for m in ack["online"]}) == len(keys), ack
            self.joined.add(room)
        elif event == "leave":
            assert ack == {"ok": True}
            self.joined.discard(room)
        elif event == "read":
            assert set(ack) == {"ok", "room", "last_id", "read_id", "unread", "mentions"} and ack["room"] == room, ack
            assert 0 <= ack["read_id"] <= ack["last_id"] and ack["unread"] <= ack["last_id"] - ack["read_id"], ack
        elif event == "typing":
            assert ack == {"ok": True}
        else:
            assert set(ack) == {"ok", "messages", "rev"}, ack
            assert all(m["room"] == room for m in ack["messages"])
            assert [m["id"] for m in ack["messages"]] == expected_history(self.room_ids.get(room, []), payload)

    async def check_silent(self, event: str, payload, outcome: set[str]) -> None:
        if outcome != {"ok"}:
            error = await self.client.next("chat_error")
            assert set(error) == {"event", "error", "message"}, error
            assert error["event"] == event and error["error"] in outcome and error["message"], (outcome, error)
            return
        room = "general" if payload.get("room") is None else payload["room"]
        if event == "send chat":
            message = await self.client.next("new chat")
            assert (message["room"], message["msg"]) == (room, payload["msg"].strip()), message
            self.room_ids.setdefault(room, []).append(message["id"])
        elif event == "join":
            self.joined.add(room)
        elif event == "leave":
            self.joined.discard(room)
        # A request that cannot have side effects, answered after everything before it.
        assert (await self.client.call("history", "barrier"))["error"] == "invalid_request"
        await asyncio.sleep(0.005)
        assert self.client.drain("chat_error") == [], (event, payload)

    async def delivered(self, message_id: int, room: str, text: str) -> None:
        message = await self.client.next("new chat")
        assert message["id"] == message_id and (message["room"], message["msg"]) == (room, text), message
        assert message["name"] == self.me["name"]
        self.room_ids.setdefault(room, []).append(message_id)

    async def bystander_still_chats(self) -> None:
        text = f"still here after {self.examples}"
        ack = await self.bystander.call("send chat", {"msg": text})
        assert ack["ok"] is True, ack
        self.room_ids.setdefault("general", []).append(ack["id"])
        while (message := await self.bystander.next("new chat"))["id"] != ack["id"]:
            pass
        assert message["msg"] == text and message["name"] == self.bystander_name
        assert self.bystander.drain("chat_error") == []
        assert self.bystander.sio.connected
        self.bystander.drain("new chat")
        self.bystander.drain("presence")
        if "general" in self.joined:  # the fuzzing client hears it too
            while (await self.client.next("new chat"))["id"] != ack["id"]:
                pass
        self.client.drain("presence")


async def test_random_payloads_at_every_event_get_their_answer_and_disturb_nobody(visitors, base_url, caplog):
    caplog.set_level(logging.WARNING)
    fuzz = Fuzzing(visitors, base_url)
    await fuzz.start()
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(step=steps)
    # Cases worth running every time, whatever hypothesis draws, in this order (the
    # first few make sure every event succeeds at least once with and without an ack).
    @example(step=("join", {"room": "fuzz"}, True))
    @example(step=("send chat", {"msg": " to fuzz ", "room": "fuzz"}, False))
    @example(step=("history", {"room": "fuzz", "limit": 1}, False))
    @example(step=("leave", {"room": "fuzz"}, False))
    @example(step=("join", {"room": "fuzz"}, False))
    @example(step=("leave", {"room": "fuzz"}, True))
    @example(step=("leave", {"room": "fuzz"}, True))
    @example(step=("send chat", {"msg": "lone \ud800 surrogate"}, True))
    @example(step=("send chat", {"msg": "\udfff"}, False))
    @example(step=("send chat", {"msg": "pair \ud83d\ude00 of escapes"}, True))
    @example(step=("history", {"room": "general", "before": 2**70}, True))
    @example(step=("history", {"room": "general", "after": 2**64, "x": "\ud800"}, False))
    @example(step=("history", {"room": "general", "limit": True}, True))
    @example(step=("history", {"room": "general", "limit": float("nan")}, True))
    @example(step=("history", {"room": "general", "since": 0, "limit": 3}, True))
    @example(step=("history", {"room": "general", "since": -1}, True))
    @example(step=("history", {"room": "general", "since": 2, "after": 1}, False))
    @example(step=("join", {"room": "abc\n"}, False))
    @example(step=("join", [{"room": "general"}], True))
    @example(step=("leave", None, False))
    @example(step=("send chat", {"msg": " " * 3000}, True))
    @example(step=("read", {"room": "general", "id": 1}, True))
    @example(step=("read", {"room": "general", "id": 2**70}, False))
    @example(step=("read", {"room": "general", "id": 0}, True))
    @example(step=("read", {"room": "nowhere", "id": 1}, False))
    @example(step=("typing", {"room": "general"}, True))
    @example(step=("typing", {"room": "general"}, False))
    @example(step=("typing", {"room": "nowhere"}, True))
    @example(step=("typing", None, False))
    def property_holds(step):
        future = asyncio.run_coroutine_threadsafe(fuzz.check(*step), loop)
        future.result(timeout=30)

    await asyncio.to_thread(property_holds)

    # Every kind of answer was exercised, the bystander still chats, nobody got hurt.
    for event in EVENTS:
        for kind in ("ok", "error"):
            for with_ack in (True, False):
                assert fuzz.outcomes.get((event, kind, with_ack), 0) > 0, (event, kind, with_ack, fuzz.outcomes)
    await fuzz.bystander_still_chats()
    await fuzz.bystander.nothing("chat_error", wait=0.3)
    await fuzz.client.nothing("chat_error", wait=0)
    async with aiohttp.ClientSession() as http, http.get(base_url + "/healthz") as response:
        assert response.status == 200
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING and not r.name.startswith("hypothesis")]
    assert problems == [], [r.getMessage() for r in problems]


# -- frames no client library sends ---------------------------------------------------------


async def test_undecodable_frames_close_their_connection_and_binary_ones_are_dropped_quietly(
    visitors, base_url, caplog
):
    caplog.set_level(logging.WARNING)
    bystander = await (await visitors()).socket()
    await bystander.next("welcome")
    visitor = await visitors()
    await visitor.session()
    # Socket.IO packets inside Engine.IO messages ("4…"); the number after the type is the ack id.
    # What does not decode breaks the protocol: that connection is closed, quietly, and only it.
    for frame in (
        '421["join",' + "[" * 5000 + "]" * 5000 + "]",  # deeper than any JSON parser goes
        '422["join",{"room":' + "9" * 6000 + "}]",  # more digits than Python reads as an int
        '423["join",{"room":"x"',  # cut short
        "4Z",  # no such packet type
    ):
        raw, connected = await RawSocket.connect(base_url, visitor.cookie)
        try:
            assert connected.startswith("40")
            await raw.send(frame)
            assert await raw.recv_event("never") == "", frame[:20]  # closed by the server
        finally:
            await raw.close()
    raw, connected = await RawSocket.connect(base_url, visitor.cookie)
    try:
        assert connected.startswith("40")
        for frame in (
            '439["an ack nobody asked for"]',
            '451-4["join",{"_placeholder":true,"num":0}]',  # a binary event: its header…
        ):
            await raw.send(frame)
        for _ in range(50):  # …and attachments, more than the header announced
            await raw.ws.send_bytes(b"\x00" * 1024)
        await raw.send('451-5["send chat",{"msg":{"_placeholder":true,"num":0}}]')
        await raw.ws.send_bytes(b"hello")
        await raw.send('426["join",{"room":"after-the-noise"}]')
        answers = []
        while not answers or answers[-1][0] != 6:
            packet = await raw.recv()
            assert packet != "", answers  # still open
            if packet.startswith("43"):
                answers.append((int(packet[2]), json.loads(packet[3:])[0]))
        # Binary payloads are not JSON: invalid_request; and the connection is still good.
        assert [number for number, _ in answers] == [4, 5, 6], answers
        assert answers[0][1]["error"] == answers[1][1]["error"] == "invalid_request", answers
        assert answers[2][1]["ok"] is True and answers[2][1]["room"] == "after-the-noise", answers
    finally:
        await raw.close()
    ack = await bystander.call("send chat", {"msg": "unaffected"})
    assert ack["ok"] is True
    while (await bystander.next("new chat"))["id"] != ack["id"]:
        pass
    assert bystander.drain("chat_error") == []
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]


async def test_a_binary_payload_from_a_client_library_is_invalid_request(visitors):
    visitor = await visitors()
    client = await visitor.socket()
    await client.next("welcome")
    for event, payload in (
        ("send chat", {"msg": b"bytes, not text"}),
        ("send chat", b"a whole binary payload"),
        ("join", {"room": b"x"}),
        ("history", {"room": "general", "limit": b"\x05"}),
    ):
        ack = await client.call(event, payload)
        assert ack["ok"] is False and ack["error"] == "invalid_request", (event, ack)
        await client.emit(event, payload)
        error = await client.next("chat_error")
        assert (error["event"], error["error"]) == (event, "invalid_request")
    # Bytes in a field nobody reads are ignored, like any unknown field.
    ack = await client.call("send chat", {"msg": "with an attachment", "blob": b"\x00\x01"})
    assert ack["ok"] is True
    assert (await client.next("new chat"))["msg"] == "with an attachment"
