"""Which `Host` headers the app and the API answer: the defence against DNS rebinding.

A web page on `attacker.example` can make its name resolve to 127.0.0.1 and then script requests to
a server on this machine as if it were its own origin; the browser still sends `Host:
attacker.example`. Refusing names the server was not told about stops that. An IP address in the
Host header is always accepted: a rebinding page cannot make the browser send one (its origin is
its name), and it is how a server bound to 0.0.0.0 is reached from the local network.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

ALLOWED_HOSTS_ENV = "MINIGPT4_ALLOWED_HOSTS"  # comma-separated names; `*.example.org` and `*` work
SPACE_HOST_ENV = "SPACE_HOST"  # set by Hugging Face Spaces to the Space's own name


@dataclass(frozen=True)
class AllowedHosts:
    """Host names a request may be addressed to (lower case; `*.x` is any name under x; `*` is any)."""

    names: frozenset[str]

    @classmethod
    def for_server(cls, bound_host: str | None, extra: Iterable[str] = ()) -> AllowedHosts:
        """`localhost`, the name the server is bound to, `extra`, and the names from the
        environment (`MINIGPT4_ALLOWED_HOSTS`, and a Space's `SPACE_HOST`)."""
        names = ["localhost", *(extra or ())]
        if bound_host and not _is_ip(bound_host):
            names.append(bound_host)
        names += os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")
        names.append(os.environ.get(SPACE_HOST_ENV, ""))
        return cls(frozenset(_normal(n) for n in names if n.strip()))

    def allows(self, host_header: str | None) -> bool:
        if "*" in self.names:
            return True
        if not host_header:
            return False  # HTTP/1.1 requires it; only hand-made requests lack it
        name = _normal(_without_port(host_header))
        if _is_ip(name):
            return True
        return name in self.names or any(n.startswith("*.") and name.endswith(n[1:]) for n in self.names)


def _normal(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _without_port(host: str) -> str:
    host = host.strip()
    if _is_ip(host):  # a bare IPv6 address has colons but no port
        return host
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware: a request addressed to a host name that is not allowed gets 400."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = _header(scope["headers"], b"host")
        if self.allowed.allows(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": {
                    "message": "this server does not answer requests for that host name "
                    f"(add it with --allowed-hosts or ${ALLOWED_HOSTS_ENV})",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "host_not_allowed",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
