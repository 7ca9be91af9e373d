"""Serve chatd with parts of its tuning switched off, for `bench/handshakes.py`.

    python bench/serve_variant.py PORT DATA_DIR [--stdlib-json] [--asyncio] [--no-gc-freeze]

Not a way to run chatd: it exists so the benchmark can compare each tuning
choice (uvloop, orjson, gc.freeze) against the library
default on the same code.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path

from aiohttp import web

from chatd.config import Config, load_secret_keys
from chatd.web import REALTIME, STORAGE, create_app


async def serve(port: int, data_dir: Path, flags: set[str]) -> None:
    # --guest-rate 0: every benchmark guest comes from 127.0.0.1.
    config = Config(port=port, data_dir=data_dir, guest_rate=0.0, secret_keys=load_secret_keys(data_dir))
    app = create_app(config)
    sio = app[REALTIME].sio
    if "--stdlib-json" in flags:
        sio.packet_class.json = json
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # A realistic `welcome`: a full page of history to serialise on every handshake.
    for i in range(50):
        await app[STORAGE].add_message("general", f"guest-{i:04d}", None, "a typical chat line " * 5, time.time())
    await web.TCPSite(runner, "127.0.0.1", port).start()
    if "--no-gc-freeze" not in flags:
        gc.collect()
        gc.freeze()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    port, data_dir, flags = int(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3:])
    if "--asyncio" in flags:
        asyncio.run(serve(port, data_dir, flags))
    else:
        import uvloop

        uvloop.run(serve(port, data_dir, flags))


if __name__ == "__main__":
    main()
