"""The HTTP middlewares, outermost first, and the headers every response carries.

The order they run in is set in web.py's `create_app`.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from .config import origin_allowed as config_origin_allowed
from .keys import BODY, CONFIG, NEW_IDENTITIES, USER
from .limits import retry_after
from .sessions import guest_name, issue_session, read_session
from .storage import OUTAGE_RETRY_AFTER, StorageError

log = logging.getLogger("chatd.web")

MAX_BODY_BYTES = 16 * 1024

# Served with every response: no inline script, nothing from other origins.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class ApiError(Exception):
    """An error answer of SPEC's shape: {"error": code, "message": sentence}."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> web.Response:
        return web.json_response(
            {"error": self.code, "message": self.message}, status=self.status, headers=self.headers
        )


# -- origins ------------------------------------------------------------------


def own_origin(request: web.Request) -> str:
    # The scheme is X-Forwarded-Proto's behind a --trusted-proxy (forwarded.py); the host is always Host.
    return f"{request.scheme}://{request.host}"


def origin_allowed(origin: str | None, request: web.Request) -> bool:
    return config_origin_allowed(origin, own_origin(request), request.app[CONFIG].allow_origins)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


@web.middleware
async def storage_outage(request: web.Request, handler) -> web.StreamResponse:
    """Storage that cannot answer (a database gone away) is a 503 in SPEC's shape, never a 500.

    Outermost but for the proxy middleware: reading the session cookie already
    asks storage whether the session was revoked.
    """
    try:
        return await handler(request)
    except StorageError:
        log.warning("storage is unreachable; answering 503")
        message = "chatd cannot reach its storage; try again shortly."
        return ApiError(503, "unavailable", message, {"Retry-After": str(OUTAGE_RETRY_AFTER)}).response()


@web.middleware
async def api_errors(request: web.Request, handler) -> web.StreamResponse:
    """ApiError becomes SPEC's JSON error; on /api/*, so do aiohttp's own 404/405."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if not is_api(request) or exc.status < 400:
            raise
        return _api_error_for(request, exc).response()


def _api_error_for(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own errors on /api/*, in SPEC's shape (only `Allow` of their headers matters)."""
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return ApiError(
            405, "method_not_allowed", f"{request.path} does not take {request.method}; use {allow}.", {"Allow": allow}
        )
    if exc.status == 404:
        return ApiError(404, "not_found", f"There is no API route {request.path}.")
    return ApiError(exc.status, "http_error", exc.reason)


@web.middleware
async def cors(request: web.Request, handler) -> web.StreamResponse:
    """CORS with credentials for --allow-origin origins only, never `*`."""
    origin = request.headers.get("Origin")
    foreign_but_allowed = origin is not None and origin != own_origin(request) and origin_allowed(origin, request)
    if request.method == "OPTIONS" and is_api(request) and origin is not None:
        if not foreign_but_allowed:
            return ApiError(403, "forbidden_origin", "This origin may not call chatd's API.").response()
        response: web.StreamResponse = web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            },
        )
    else:
        response = await handler(request)
    if foreign_but_allowed and is_api(request):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers.add("Vary", "Origin")
    return response


@web.middleware
async def post_hygiene(request: web.Request, handler) -> web.StreamResponse:
    """Every POST: an allowed Origin, a JSON content type, a small body that parses."""
    if request.method != "POST" or not is_api(request) or request.match_info.http_exception is not None:
        return await handler(request)  # not ours, or the router's 404/405 comes first
    if not origin_allowed(request.headers.get("Origin"), request):
        raise ApiError(403, "forbidden_origin", "This origin may not call chatd's API.")
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the body as Content-Type: application/json.")
    request[BODY] = _parse_json(await _read_body(request))
    return await handler(request)


async def _read_body(request: web.Request) -> bytes:
    too_large = ApiError(413, "payload_too_large", f"Request bodies are at most {MAX_BODY_BYTES} bytes.")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    while chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _parse_json(body: bytes) -> object:
    if not body.strip():
        return None  # an empty body; handlers that need one say invalid_request
    try:
        # parse_constant: Python's json reads NaN and Infinity, which JSON has not.
        return json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
    except RecursionError:
        # Valid JSON nested deeper than Python parses; no request of ours has that shape.
        raise ApiError(400, "invalid_request", "The body is nested too deeply.") from None


@web.middleware
async def ensure_session(request: web.Request, handler) -> web.StreamResponse:
    """The page and every /api/* route run with a valid session: a new guest one if need be."""
    if request.path == "/" or is_api(request):
        session = await read_session(request)
        if session.user is None:
            try:
                await draw_new_identity(request)
            except ApiError as refused:  # answered before a session is issued: no cookie
                return refused.response() if is_api(request) else _too_many_page(refused)
        request[USER] = session.user or await issue_session(request, guest_name(), None)
    return await handler(request)


async def draw_new_identity(request: web.Request) -> None:
    """A guest session or an account: one token of the client address's bucket, else 429 (limits/)."""
    # request.remote is the forwarded client address behind a --trusted-proxy (forwarded.py).
    wait = await request.app[NEW_IDENTITIES].take(request.remote or "")
    if wait:
        message = "Too many new sessions from your address; try again later."
        raise ApiError(429, "too_many_requests", message, {"Retry-After": str(retry_after(wait))})


def _too_many_page(refused: ApiError) -> web.Response:
    page = f"<!doctype html><meta charset=utf-8><title>chatd</title><p>{refused.message}</p>\n"
    return web.Response(text=page, content_type="text/html", status=refused.status, headers=refused.headers)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
