"""Life behind a reverse proxy: `--trusted-proxy ADDR` (an IP address or CIDR network).

A request whose TCP peer is one of those proxies has its client address and
scheme taken from `X-Forwarded-For` / `X-Forwarded-Proto`; from any other peer
those headers are ignored. The parsing and the choice of the client (the
rightmost `X-Forwarded-For` entry that is not itself a trusted proxy) are
aiohttp-remotes' `XForwardedFiltered`; this module adds what it leaves to us:
believing the headers only from a trusted peer, and never `X-Forwarded-Host`.
Everything downstream (login throttle, same-origin checks, the Socket.IO
handshake) reads the result as `request.remote` and `request.scheme`.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable

from aiohttp import web
from aiohttp_remotes import XForwardedFiltered
from aiohttp_remotes.exceptions import RemoteError

log = logging.getLogger("chatd.forwarded")


class TrustedProxies(XForwardedFiltered):
    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        super().__init__(set(self.networks))

    def trusts(self, request: web.Request) -> bool:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not peer or not isinstance(peer, tuple):
            return False  # gone already, or a Unix socket
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def get_forwarded_host(self, headers) -> list[str]:
        return []  # X-Forwarded-Host is never believed: same-origin checks use the Host header

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if not self.trusts(request):
            return await handler(request)
        try:
            self.get_forwarded_for(request.headers)  # readable? (the library answers a plain-text 400 if not)
            self.get_forwarded_proto(request.headers)
        except (web.HTTPBadRequest, RemoteError):
            log.warning("a trusted proxy sent X-Forwarded-* headers that cannot be read")
            return web.json_response(
                {"error": "invalid_request", "message": "The proxy's X-Forwarded-For header cannot be read."},
                status=400,
            )
        return await super().middleware(request, handler)
