"""Command-line flags, their CHATD_* environment variables, and the secret keys.

Every flag reads `CHATD_<FLAG>` as its default, so a command line always wins
over the environment. Bad configuration raises `ConfigError`, which the
command line turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet

KEY_FILE_NAME = "secret.key"
DATABASE_FILE_NAME = "chatd.sqlite3"
USERNAME_RE = re.compile(r"[A-Za-z0-9_.\-]{3,24}")  # as accounts.py: an --operator is a username

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """A configuration problem, worded for the person starting chatd."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("chatd-data")
    session_ttl: int = 604800
    secure_cookie: bool = False
    allow_origins: tuple[str, ...] = ()
    log_level: str = "info"
    database_url: str | None = None  # None: SQLite in the data dir
    redis_url: str | None = None  # None: one process, everything in memory
    chat_burst: int = 20
    chat_rate: float = 5.0  # messages per second; 0 switches the chat limit off
    guest_burst: int = 60  # new identities (guest sessions, accounts) one client address may make at once
    guest_rate: float = 0.2  # per second; 0 switches the limit on new identities off
    trusted_proxies: tuple[str, ...] = ()  # IP addresses or CIDR networks
    metrics: bool = False
    operators: tuple[str, ...] = ()  # lower-cased usernames of accounts that moderate every room
    websocket_compression: bool = False  # permessage-deflate when a client offers it
    # Fernet keys: the first encrypts, all of them decrypt.
    secret_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def database_path(self) -> Path:
        return self.data_dir / DATABASE_FILE_NAME


def parse_bool(text: str, source: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{source}: expected 1/true/yes or 0/false/no, got {text!r}")


def parse_int(text: str, source: str, minimum: int, maximum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{source}: expected a whole number, got {text!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{source}: must be between {minimum} and {maximum}, got {value}")
    return value


def parse_float(text: str, source: str, minimum: float, maximum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{source}: expected a number, got {text!r}") from None
    if not minimum <= value <= maximum:  # also refuses nan
        raise ConfigError(f"{source}: must be between {minimum:g} and {maximum:g}, got {text!r}")
    return value


def parse_network(text: str, source: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ConfigError(f"{source}: expected an IP address or a CIDR network, got {text!r}") from None


def parse_url(text: str, source: str, schemes: tuple[str, ...]) -> str:
    from yarl import URL

    text = text.strip()
    try:
        scheme = URL(text).scheme
    except ValueError:
        scheme = ""
    if scheme not in schemes:
        raise ConfigError(f"{source}: expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
    return text


def origin_allowed(origin: str | None, own_origin: str, allow_origins: tuple[str, ...]) -> bool:
    """No Origin header (not a browser's cross-site call), our own origin, or one of --allow-origin."""
    return origin is None or origin == own_origin or origin in allow_origins


def parse_origin(text: str, source: str) -> str:
    from yarl import URL

    url = URL(text.strip())
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") or url.query_string:
        raise ConfigError(f"{source}: expected an origin such as https://chat.example.org, got {text!r}")
    return str(url.origin())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatd",
        description=(
            "chatd: a chat server whose identity lives in an encrypted session cookie. "
            "Every flag can also be set with the environment variable CHATD_<FLAG> "
            "(upper case, dashes as underscores). `python -m chatd keygen` prints a new secret key."
        ),
    )
    parser.add_argument("--host", help="address to listen on (CHATD_HOST; default 127.0.0.1)")
    parser.add_argument("--port", help="TCP port to listen on (CHATD_PORT; default 8080)")
    parser.add_argument(
        "--data-dir",
        help="directory for the SQLite database and the generated secret.key (CHATD_DATA_DIR; default ./chatd-data)",
    )
    parser.add_argument(
        "--session-ttl",
        help="seconds a session lasts from the moment it is issued (CHATD_SESSION_TTL; default 604800, one week)",
    )
    parser.add_argument(
        "--secure-cookie",
        action="store_const",
        const="true",
        help="mark the session cookie Secure; use it when chatd is served over HTTPS (CHATD_SECURE_COOKIE)",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        metavar="URL",
        help=(
            "another origin allowed to call the API and open sockets with credentials, besides chatd's own; "
            "repeatable (CHATD_ALLOW_ORIGIN, comma-separated)"
        ),
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="postgresql://… to keep accounts and messages in PostgreSQL (CHATD_DATABASE_URL; default SQLite in the data dir)",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="redis://… shared by several chatd processes that are one chat (CHATD_REDIS_URL; default: one process)",
    )
    parser.add_argument(
        "--chat-burst",
        metavar="N",
        help="messages a session may send at once before the rate applies (CHATD_CHAT_BURST; default 20)",
    )
    parser.add_argument(
        "--chat-rate",
        metavar="R",
        help="messages per second a session's burst refills at; 0 switches the chat limit off (CHATD_CHAT_RATE; default 5)",
    )
    parser.add_argument(
        "--guest-burst",
        metavar="N",
        help="new guest sessions and accounts one client address may make at once (CHATD_GUEST_BURST; default 60)",
    )
    parser.add_argument(
        "--guest-rate",
        metavar="R",
        help=(
            "per second, the refill of each address's new-identity burst; 0 switches that limit off "
            "(CHATD_GUEST_RATE; default 0.2)"
        ),
    )
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDR",
        help=(
            "a reverse proxy (IP address or CIDR network) whose X-Forwarded-For and X-Forwarded-Proto are believed; "
            "repeatable (CHATD_TRUSTED_PROXY, comma-separated)"
        ),
    )
    parser.add_argument(
        "--operator",
        action="append",
        metavar="USERNAME",
        help="an account that moderates every room; repeatable (CHATD_OPERATOR, comma-separated)",
    )
    parser.add_argument(
        "--metrics",
        action="store_const",
        const="true",
        help="serve Prometheus metrics at GET /metrics (CHATD_METRICS)",
    )
    parser.add_argument(
        "--websocket-compression",
        action="store_const",
        const="true",
        help=(
            "compress websocket frames (permessage-deflate) for clients that offer it; off by default: it costs "
            "the server several times the CPU of a broadcast (CHATD_WEBSOCKET_COMPRESSION)"
        ),
    )
    parser.add_argument(
        "--log-level",
        help="debug, info, warning or error (CHATD_LOG_LEVEL; default info)",
    )
    return parser


def config_from_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Parse flags over environment variables. Secret keys are not loaded here."""
    args = build_parser().parse_args(argv)
    global_env = os.environ if environ is None else environ

    def pick(flag: str, value):
        if value is not None:
            return value, "--" + flag
        name = "CHATD_" + flag.upper().replace("-", "_")
        return global_env.get(name), name

    defaults = Config()
    host, _ = pick("host", args.host)
    port, port_src = pick("port", args.port)
    data_dir, _ = pick("data-dir", args.data_dir)
    ttl, ttl_src = pick("session-ttl", args.session_ttl)
    secure, secure_src = pick("secure-cookie", args.secure_cookie)
    log_level, log_src = pick("log-level", args.log_level)
    database_url, database_src = pick("database-url", args.database_url)
    redis_url, redis_src = pick("redis-url", args.redis_url)
    burst, burst_src = pick("chat-burst", args.chat_burst)
    rate, rate_src = pick("chat-rate", args.chat_rate)
    guest_burst, guest_burst_src = pick("guest-burst", args.guest_burst)
    guest_rate, guest_rate_src = pick("guest-rate", args.guest_rate)
    metrics, metrics_src = pick("metrics", args.metrics)
    compression, compression_src = pick("websocket-compression", args.websocket_compression)

    def listed(flag: str, values: list[str] | None) -> list[tuple[str, str]]:
        if values is not None:
            return [(v, "--" + flag) for v in values]
        name = "CHATD_" + flag.upper().replace("-", "_")
        return [(v, name) for v in global_env.get(name, "").split(",") if v.strip()]

    origins = listed("allow-origin", args.allow_origin)
    proxies = listed("trusted-proxy", args.trusted_proxy)
    operators = listed("operator", args.operator)

    level = (log_level or defaults.log_level).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{log_src}: expected debug, info, warning or error, got {log_level!r}")

    return Config(
        host=host or defaults.host,
        port=parse_int(port, port_src, 0, 65535) if port is not None else defaults.port,
        data_dir=Path(data_dir) if data_dir else defaults.data_dir,
        session_ttl=parse_int(ttl, ttl_src, 1, 10 * 365 * 86400) if ttl is not None else defaults.session_ttl,
        secure_cookie=parse_bool(secure, secure_src) if secure is not None else False,
        allow_origins=tuple(parse_origin(o, src) for o, src in origins),
        log_level=level,
        database_url=parse_url(database_url, database_src, ("postgresql", "postgres")) if database_url else None,
        redis_url=parse_url(redis_url, redis_src, ("redis", "rediss", "unix")) if redis_url else None,
        chat_burst=parse_int(burst, burst_src, 1, 1_000_000) if burst is not None else defaults.chat_burst,
        chat_rate=parse_float(rate, rate_src, 0, 1_000_000) if rate is not None else defaults.chat_rate,
        guest_burst=(
            parse_int(guest_burst, guest_burst_src, 1, 1_000_000) if guest_burst is not None else defaults.guest_burst
        ),
        guest_rate=(
            parse_float(guest_rate, guest_rate_src, 0, 1_000_000) if guest_rate is not None else defaults.guest_rate
        ),
        trusted_proxies=tuple(parse_network(p, src) for p, src in proxies),
        metrics=parse_bool(metrics, metrics_src) if metrics is not None else False,
        operators=tuple(parse_operator(name, src) for name, src in operators),
        websocket_compression=parse_bool(compression, compression_src) if compression is not None else False,
    )


def parse_operator(text: str, source: str) -> str:
    name = text.strip()
    if not USERNAME_RE.fullmatch(name):
        raise ConfigError(f"{source}: not a username (3 to 24 of A-Z a-z 0-9 _ . -): {text!r}")
    return name.lower()


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def _check_key(key: str, source: str) -> str:
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise ConfigError(f"{source}: not a valid Fernet key (make one with `python -m chatd keygen`)") from None
    return key


def load_secret_keys(data_dir: Path, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """CHATD_SECRET_KEYS if set, else `<data-dir>/secret.key`, created 0600 on first start."""
    env = os.environ if environ is None else environ
    listed = env.get("CHATD_SECRET_KEYS", "")
    if listed.strip():
        keys = [k.strip() for k in listed.split(",") if k.strip()]
        return tuple(_check_key(k, f"CHATD_SECRET_KEYS (key {i + 1})") for i, k in enumerate(keys))

    path = data_dir / KEY_FILE_NAME
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: never overwrite a key another process has just written.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            text = path.read_text(encoding="ascii").strip()
        else:
            text = generate_key()
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text + "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot use key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return (_check_key(text, str(path)),)
