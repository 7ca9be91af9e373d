"""Each socket's rooms, indexed, so that a disconnect costs the socket's own rooms.

python-socketio's managers find a disconnecting socket's rooms by copying the
namespace's whole room table and testing every room (`basic_disconnect`,
`get_rooms`): O(all rooms) per disconnect. chatd has at least two rooms per
socket (its sid room and its session's room), so when thousands of sockets
drop at once (a network blip, a restart) that is O(N²): about a millisecond
per disconnect with 2,500 sockets. `RoomIndex` keeps a sid -> rooms index
beside the manager's table and answers both from it.

It is a mixin, to go in front of whichever manager chatd uses (the in-process
`AsyncManager`, a Redis manager, a fast-broadcast manager): `indexed(cls)`.
It relies on how python-socketio 5.18 stores rooms (`self.rooms[namespace][room]`,
a bidict of sid -> eio sid) and on what `basic_disconnect` does besides leaving
rooms; setup.cfg pins that minor version and tests/test_presence.py checks the
internals it copies.
"""

from __future__ import annotations

import socketio


class RoomIndex:
    rooms: dict
    callbacks: dict
    pending_connect: dict
    pending_disconnect: dict

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rooms_of: dict[tuple[str, str], set] = {}  # (namespace, sid) -> rooms

    def basic_enter_room(self, sid, namespace, room, eio_sid=None):
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self._rooms_of.setdefault((namespace, sid), set()).add(room)

    def basic_leave_room(self, sid, namespace, room):
        super().basic_leave_room(sid, namespace, room)
        rooms = self._rooms_of.get((namespace, sid))
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[(namespace, sid)]

    def get_rooms(self, sid, namespace):
        return [room for room in self._rooms_of.get((namespace, sid), ()) if room is not None]

    def basic_disconnect(self, sid, namespace, **kwargs):
        """python-socketio 5.18's `basic_disconnect`, with the room scan replaced by the index."""
        if namespace not in self.rooms:
            return
        for room in list(self._rooms_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self._rooms_of.pop((namespace, sid), None)
        if sid in self.callbacks:
            del self.callbacks[sid]
        for pending in (self.pending_connect, self.pending_disconnect):
            if namespace in pending and sid in pending[namespace]:
                pending[namespace].remove(sid)
                if len(pending[namespace]) == 0:
                    del pending[namespace]


def indexed(manager_class: type) -> type:
    """`manager_class` with each socket's rooms indexed."""
    return type(f"Indexed{manager_class.__name__}", (RoomIndex, manager_class), {})


IndexedAsyncManager = indexed(socketio.AsyncManager)
