"""The kernel's price of one write to each of thousands of loopback TCP sockets.

    .venv/bin/python bench/loopback.py [--sockets 4000] [--rounds 20] [--sizes 100,5000,20000,45000]

What a presence batch costs chatd below Python: one `send` per socket in the
room. This writer, pinned to CPU 0 like the server in `bench/presence.py`,
sends one buffer of each size to every socket, round after round; a reader
process pinned to CPU 1, like the load generator, drains every socket with
epoll and throws the bytes away. Printed for each size: the writer's system
time per write (the kernel's work on the sending CPU; on loopback that
includes much of the receiving socket's TCP work, which a network would put
on another machine) and its user time per write (this script's own loop, not
chatd's). No chatd here: it is the floor under `bench/presence.py`'s fan-out.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import sys
import time


def reader(port: int, count: int, ready_w: int) -> None:
    """Connect `count` sockets and drain them all until the writer closes them."""
    os.sched_setaffinity(0, {1})
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    os.write(ready_w, b"x")
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    buf = bytearray(1 << 16)
    open_ = len(by_fd)
    while open_:
        for fd, _ in ep.poll():
            s = by_fd[fd]
            try:
                while True:
                    n = s.recv_into(buf)
                    if n == 0:
                        ep.unregister(fd)
                        open_ -= 1
                        break
            except BlockingIOError:
                pass
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", default="100,5000,20000,45000")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two CPUs: the writer on CPU 0, the reader on CPU 1")
    os.sched_setaffinity(0, {0})
    listener = socket.create_server(("127.0.0.1", 0), backlog=args.sockets)
    port = listener.getsockname()[1]
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        listener.close()
        reader(port, args.sockets, ready_w)
    conns = [listener.accept()[0] for _ in range(args.sockets)]
    os.read(ready_r, 1)
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"{args.sockets} loopback sockets, writer on CPU 0, reader on CPU 1, {args.rounds} rounds per size")
    print(f"{'bytes per write':>16}  {'system per write':>17}  {'user per write':>15}  {'writes/s':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        payload = b"x" * size
        for c in conns:  # a round unmeasured: buffers grown, caches warm
            c.sendall(payload)
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.rounds):
            for c in conns:
                c.sendall(payload)
        after, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        writes = args.rounds * len(conns)
        system = (after.ru_stime - before.ru_stime) / writes * 1e6
        user = (after.ru_utime - before.ru_utime) / writes * 1e6
        print(f"{size:>16,}  {system:>14.1f} µs  {user:>12.1f} µs  {writes / (t1 - t0):>9,.0f}")
    for c in conns:
        c.close()
    os.waitpid(child, 0)


if __name__ == "__main__":
    main()
