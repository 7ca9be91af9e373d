"""Every garbage collection of a `python -m chatd` process, timed (`bench/presence.py --collections`).

On PYTHONPATH with CHATD_BENCH_GC_LOG set, Python imports this at start-up; in
chatd's process only (not the bench's, nor a tool's) it times each collection
with `gc.callbacks` and, at exit, writes them to that file as JSON: one
[generation, seconds] pair per collection, in order. A collection holds the
GIL, so each one is a pause of every thread, the event loop's included.
"""

import os
import sys

if os.environ.get("CHATD_BENCH_GC_LOG") and sys.orig_argv[1:3] == ["-m", "chatd"]:
    import atexit
    import gc
    import json
    import time

    _log = os.environ["CHATD_BENCH_GC_LOG"]
    _collections: list[tuple[int, float]] = []
    _started = [0.0]

    def _timed(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        else:
            _collections.append((info["generation"], time.perf_counter() - _started[0]))

    def _write() -> None:
        with open(_log, "w") as f:
            json.dump(_collections, f)

    gc.callbacks.append(_timed)
    atexit.register(_write)
