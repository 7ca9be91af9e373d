"""The HTTP API's handlers: the page, the session, register, log in, log out, health and metrics.

Each runs after the middlewares (middlewares.py): the request has a session
(`request[USER]`) and, for a POST, a parsed JSON body (`request[BODY]`).
"""

from __future__ import annotations

import asyncio
import importlib.resources
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .accounts import password_problem, username_problem
from .keys import ACCOUNTS, BODY, LOGIN_THROTTLE, METRICS, REALTIME, STORAGE, USER
from .middlewares import ApiError, draw_new_identity
from .sessions import Identity, guest_name, issue_session, read_session
from .storage import StorageError


def _public_dir() -> Path:
    """The page's files, inside the installed package (public/ in a checkout, through the chatd/public link)."""
    files = importlib.resources.files("chatd") / "public"
    # Editable installs, wheels and shiv's unpacked zipapp are all real folders,
    # which aiohttp's static route needs.
    if not isinstance(files, Path) or not files.is_dir():
        raise RuntimeError(f"chatd's page is missing from the installed package ({files})")
    return files


PUBLIC_DIR = _public_dir()


async def index(request: web.Request) -> web.Response:
    # A plain Response, not a FileResponse: aiohttp-session only sets cookies on
    # the former, and the first page view must carry the guest cookie.
    page = await asyncio.to_thread((PUBLIC_DIR / "index.html").read_bytes)
    return web.Response(body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})


async def get_session_info(request: web.Request) -> web.Response:
    return web.json_response(request[USER].public())


def _credentials(request: web.Request) -> tuple[str, str]:
    body = request[BODY]
    if not (
        isinstance(body, dict) and isinstance(body.get("username"), str) and isinstance(body.get("password"), str)
    ):
        raise ApiError(400, "invalid_request", "Send {\"username\": string, \"password\": string}.")
    return body["username"], body["password"]


async def _switch_session(request: web.Request, name: str, account: str | None, reason: str) -> Identity:
    """Revoke the request's session (if the client already had it) and issue a new one.

    A new sid every time: no session fixation. The old session's sockets, on
    every process, get `session_ended` and are disconnected.
    """
    current = await read_session(request)
    old = None if current.new else current.user
    user = await issue_session(request, name, account)
    if old is not None:
        await request.app[STORAGE].revoke_session(old.sid, old.expires_at)
        await request.app[REALTIME].end_session(old.sid, reason)
    return user


async def register(request: web.Request) -> web.Response:
    username, password = _credentials(request)
    problem = username_problem(username) or password_problem(password)
    if problem:
        raise ApiError(400, "invalid_request", problem)
    if not (await read_session(request)).new:  # else the guest session this request was given has drawn already
        await draw_new_identity(request)
    if not await request.app[ACCOUNTS].register(username, password):
        raise ApiError(409, "username_taken", "That username is taken.")
    user = await _switch_session(request, username, username, "login")
    return web.json_response(user.member(), status=201)


async def login(request: web.Request) -> web.Response:
    username, password = _credentials(request)
    throttle = request.app[LOGIN_THROTTLE]
    # request.remote is the forwarded client address behind a --trusted-proxy (forwarded.py).
    key = (username.lower(), request.remote or "")
    # Counted as failed before the (slow) check, so parallel attempts cannot outrun the limit.
    wait = await throttle.attempt(key)
    if wait:
        raise ApiError(
            429, "too_many_attempts", "Too many failed logins; try again later.", headers={"Retry-After": str(wait)}
        )
    account = await request.app[ACCOUNTS].verify(username, password)
    if account is None:
        raise ApiError(401, "invalid_credentials", "Wrong username or password.")
    await throttle.succeeded(key)
    user = await _switch_session(request, account, account, "login")
    return web.json_response(user.member())


async def logout(request: web.Request) -> web.Response:
    if request[BODY] is not None and not isinstance(request[BODY], dict):
        raise ApiError(400, "invalid_request", "Send {} or an empty body.")
    user = await _switch_session(request, guest_name(), None, "logout")
    return web.json_response(user.member())


async def metrics_page(request: web.Request) -> web.Response:
    body = await request.app[METRICS].exposition(*request.app[REALTIME].online_counts())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[STORAGE].ping()
    except StorageError:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok"})
