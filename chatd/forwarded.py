"""Life behind a reverse proxy: `--trusted-proxy ADDR` (an IP address or CIDR network).

A request whose TCP peer is one of those proxies has its client address taken
from `X-Forwarded-For` and its scheme from `X-Forwarded-Proto`, each header on
its own: a proxy that sends only `X-Forwarded-Proto` still sets the scheme.
From any other peer both are ignored, and `X-Forwarded-Host` is never believed
(the origin is always the `Host` header's). Everything downstream (login
throttle, the limit on new identities, same-origin checks, the Socket.IO
handshake, which is an aiohttp request too) reads the result as
`request.remote` and `request.scheme`, set with aiohttp's public
`Request.clone(remote=..., scheme=...)`.

The client is the rightmost `X-Forwarded-For` entry that is not itself a
trusted proxy (whatever a client writes into the header itself sits to the
left of what the proxies appended); when every entry is a trusted proxy, the
leftmost. The scheme is the `X-Forwarded-Proto` entry of the same hop, counted
from the right, or its leftmost entry when the list is shorter (some proxies
keep only one); without `X-Forwarded-For`, its rightmost entry (what the
trusted peer itself saw). Several header lines of one name are one list, in
order (RFC 9110, 5.3). A header from a trusted peer that cannot be read is a
400 `invalid_request`.

(This replaced aiohttp-remotes' `XForwardedFiltered`, which applies the scheme
only together with an `X-Forwarded-For`, reads the peer from no header at all
and answers unreadable headers with a plain-text 400; what is left of it is
these few lines.)
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable

from aiohttp import hdrs, web

log = logging.getLogger("chatd.forwarded")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = ("http", "https")


class UnreadableHeader(ValueError):
    pass


def _address(text: str) -> IPAddress:
    address = ipaddress.ip_address(text)
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    return getattr(address, "ipv4_mapped", None) or address


def _listed(request: web.Request, name: str) -> list[str]:
    """Every line of the header, as one comma-separated list of stripped entries."""
    lines = request.headers.getall(name, [])
    return [entry.strip() for entry in ",".join(lines).split(",")] if lines else []


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def trusts(self, request: web.Request) -> bool:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not peer or not isinstance(peer, tuple):
            return False  # gone already, or a Unix socket
        try:
            return self.trusted(_address(peer[0]))
        except ValueError:
            return False

    def forwarded(self, request: web.Request) -> dict[str, str]:
        """`remote` and `scheme` as a trusted peer's headers tell them (each only if sent)."""
        changes: dict[str, str] = {}
        hop = 0  # the client's place in X-Forwarded-For, from the right
        try:
            chain = [_address(entry) for entry in reversed(_listed(request, hdrs.X_FORWARDED_FOR))]
        except ValueError:
            raise UnreadableHeader("X-Forwarded-For") from None
        if chain:
            hop = next((i for i, address in enumerate(chain) if not self.trusted(address)), len(chain) - 1)
            changes["remote"] = str(chain[hop])
        protos = list(reversed(_listed(request, hdrs.X_FORWARDED_PROTO)))
        if protos:
            scheme = protos[min(hop, len(protos) - 1)].lower()
            if scheme not in SCHEMES:
                raise UnreadableHeader("X-Forwarded-Proto")
            changes["scheme"] = scheme
        return changes

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if not self.trusts(request):
            return await handler(request)
        try:
            changes = self.forwarded(request)
        except UnreadableHeader as exc:
            log.warning("a trusted proxy sent an %s header that cannot be read", exc)
            return web.json_response(
                {"error": "invalid_request", "message": f"The proxy's {exc} header cannot be read."}, status=400
            )
        return await handler(request.clone(**changes) if changes else request)
