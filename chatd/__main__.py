"""The command line: `python -m chatd [flags]` serves; `python -m chatd keygen` prints a key;
`python -m chatd copy-data --from A --to B` copies a chat between storages;
`python -m chatd audit` prints the moderation log."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from .config import Config, ConfigError, config_from_args, generate_key, load_secret_keys
from .sio.versions import untested_versions
from .storage import StorageError

log = logging.getLogger("chatd")
access_log = logging.getLogger("chatd.access")

SHUTDOWN_SECONDS = 3.0  # SPEC: exit within 5 s of SIGTERM/SIGINT
GC_THRESHOLDS = (10_000, 2, 40)  # Python's default is (700, 10, 10); see tune_runtime
# How long a connection may take to send a request's head, counted from when it
# opens or its last answer ends (aiohttp's keep-alive timer, which it also starts
# on a new connection; its own default is an hour, so a head sent a byte at a
# time would hold a connection that long). Also how long an idle keep-alive
# connection stays open. CHATD_HEAD_TIMEOUT (seconds) changes it, for tests.
HEAD_TIMEOUT_SECONDS = 20.0


def head_timeout() -> float:
    try:
        return float(os.environ.get("CHATD_HEAD_TIMEOUT", HEAD_TIMEOUT_SECONDS))
    except ValueError:
        return HEAD_TIMEOUT_SECONDS
SWITCH_INTERVAL_SECONDS = 0.0005


def tune_runtime() -> None:
    """The collector and the GIL as a serving chatd wants them, once start-up is over
    (also bench/fanout.py's, which serves chatd in its own process)."""
    # Start-up objects never die: keep them out of every later collection.
    gc.collect()
    gc.freeze()
    # A broadcast or a handshake allocates thousands of short-lived containers;
    # at the default 700 the collector runs mid-burst, often (bench/run.py).
    # A generation-1 collection walks all that survived the young ones since the
    # last: every 10, a crowd's handshakes made it a 65-107 ms pause of the whole
    # process; every 2, at most 15-45 ms, and no more time in all. A full one
    # stays as rare (about every 120 young ones, once a quarter of the heap is
    # new, Python's rule). Measured with bench/presence.py --collections.
    gc.set_threshold(*GC_THRESHOLDS)
    # A storage or hashing thread that wakes while the loop is busy (a broadcast to
    # thousands) waits for the GIL up to this long; Python's default is 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        print(generate_key())
        return 0
    if argv[:1] == ["copy-data"]:
        return copy_data_command(argv[1:])
    if argv[:1] == ["audit"]:
        return audit_command(argv[1:])
    untested = untested_versions()
    if untested:  # chatd/sio relies on these libraries' internals as they were checked
        print(f"chatd: untested library versions: {'; '.join(untested)}; install chatd's pinned ranges", file=sys.stderr)
        return 2
    try:
        config = config_from_args(argv)
        config = dataclasses.replace(config, secret_keys=load_secret_keys(config.data_dir))
    except ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Access logs only at debug level: request lines are noise at scale.
    access_log.setLevel(logging.DEBUG if config.log_level == "debug" else logging.WARNING)
    # aiosqlite logs every statement with its parameters (session ids, password hashes)
    # at debug level: never let those reach a log.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop does not build everywhere
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(config))
    except (ConfigError, StorageError) as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    return 0


def copy_data_command(argv: list[str]) -> int:
    from .storage.copy import StderrProgress, copy_data

    parser = argparse.ArgumentParser(
        prog="python -m chatd copy-data",
        description="Copy accounts, messages (ids and order kept) and revoked sessions between storages. "
        "Stop chatd on both sides first.",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="DATA_DIR_OR_URL",
                        help="a data dir (SQLite) or a postgresql:// URL")  # fmt: skip
    parser.add_argument("--to", dest="target", required=True, metavar="DATA_DIR_OR_URL",
                        help="a data dir (SQLite) or a postgresql:// URL")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="empty a target that already holds data first")
    args = parser.parse_args(argv)
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    try:
        copied = asyncio.run(copy_data(args.source, args.target, force=args.force, progress=StderrProgress()))
    except StorageError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    print("copied " + ", ".join(f"{n} {table}" for table, n in copied.items()))
    return 0


def audit_command(argv: list[str]) -> int:
    from .storage.audit import print_audit

    parser = argparse.ArgumentParser(
        prog="python -m chatd audit", description="Print the moderation log, newest first: time, actor, action, target, room."
    )
    parser.add_argument("--room", help="only this room's actions")
    parser.add_argument("--limit", type=int, default=50, help="at most this many lines (default 50)")
    parser.add_argument("--data-dir", help="the data dir of a chatd on SQLite (CHATD_DATA_DIR; default ./chatd-data)")
    parser.add_argument("--database-url", metavar="URL", help="the PostgreSQL of a chatd (CHATD_DATABASE_URL)")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit is at least 1")
    url = args.database_url or os.environ.get("CHATD_DATABASE_URL")
    data_dir = Path(args.data_dir or os.environ.get("CHATD_DATA_DIR") or Config().data_dir)
    try:
        print_audit(url, data_dir, args.room, args.limit)
    except StorageError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    return 0


async def serve(config: Config) -> None:
    from .web import create_app  # after the version check: it imports the libraries chatd/sio patches

    app = create_app(config)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_SECONDS,
        access_log=access_log,
        keepalive_timeout=head_timeout(),
    )
    await runner.setup()
    # Before the "serving on" line: a SIGTERM sent as soon as it appears must stop cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:  # the port is taken, the address is not ours, ...
            raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        for host, port in (a[:2] for a in runner.addresses):
            shown = f"[{host}]" if ":" in host else host
            print(f"chatd: serving on http://{shown}:{port}/", flush=True)
        tune_runtime()
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
