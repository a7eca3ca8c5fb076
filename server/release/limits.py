"""What keeps the portal standing under abuse: a request body cap enforced before and while reading, a deadline
for receiving each request, a cap on connections per client address, and per-client throttling of failed
authentication.

- `BodyLimit` (ASGI middleware): a Content-Length above the cap is answered 413 before a byte of the body is read;
  a body without a length (chunked) is counted while it streams and cut off at the cap with 413. uvicorn reads at
  most its flow-control window ahead of the app, so an oversized body never sits in memory.
- `guarded_protocol` (a uvicorn HTTP protocol class): uvicorn has no header or body read timeout and no
  per-client connection limit, so this subclass of its h11 protocol closes a connection that has not delivered a
  complete request (headers and body) within `request_timeout` seconds of its first byte or of the previous
  response, and refuses, with 503, a connection from an address that already holds `max_per_client` open ones.
  Connections from a trusted reverse proxy are exempt from that cap: the proxy enforces it per real client
  (deploy/README.md).
- `AuthThrottle`: after `max_failures` failed authentications from one client address within `window` seconds,
  every authentication from that address is answered 429 (with Retry-After) until the window has passed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class Limits:
    """The portal's limits (`fedsynth portal serve` flags of the same names)."""

    max_body: int = 64 * 1024  # bytes of a request body (logins, decisions, admin calls)
    request_timeout: float = 10.0  # seconds to deliver a whole request (headers and body)
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_per_client: int = 16  # open connections per client address
    max_connections: int = 512  # open connections and requests in all (uvicorn's limit_concurrency)
    max_header_bytes: int = 16 * 1024  # request line and headers
    max_auth_failures: int = 10  # failed authentications per client address ...
    auth_window: float = 300.0  # ... within this many seconds, then 429 until the window has passed


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_body` bytes, decided before reading when the client
    declares a Content-Length, and while reading otherwise."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._refuse(send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body over {self.max_body} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class AuthThrottle:
    """Failed authentications per client address in a sliding window (thread-safe; in memory: a restart forgets,
    which only ever lets a client in sooner)."""

    def __init__(self, max_failures: int, window: float):
        self.max_failures, self.window = max_failures, window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, client: str, t: float) -> deque[float]:
        q = self._failures[client]
        while q and q[0] <= t - self.window:
            q.popleft()
        return q

    def retry_after(self, client: str) -> int:
        """0 if `client` may try to authenticate now, else the seconds until it may."""
        t = time.monotonic()
        with self._lock:
            q = self._recent(client, t)
            if len(q) < self.max_failures:
                if not q:
                    self._failures.pop(client, None)
                return 0
            return max(1, int(q[-self.max_failures] + self.window - t + 1))

    def failed(self, client: str) -> None:
        t = time.monotonic()
        with self._lock:
            self._recent(client, t).append(t)
            if len(self._failures) > 100_000:  # bound the memory: forget the quietest addresses
                for k in [k for k, q in self._failures.items() if len(q) < self.max_failures][
                    :50_000
                ]:
                    del self._failures[k]


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"retry-after: 5\r\nconnection: close\r\ncontent-length: 45\r\n\r\n"
    b"too many open connections from this address\n"
)


def guarded_protocol(limits: Limits, trusted_proxies: frozenset[str] = frozenset()) -> type:
    """A uvicorn h11 protocol class with a request deadline and a per-client connection cap (module docstring)."""
    open_by_client: dict[str, int] = defaultdict(int)

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            host = self.client[0] if self.client else "-"
            if host not in trusted_proxies:
                if open_by_client[host] >= limits.max_per_client:
                    transport.write(_BUSY)
                    transport.close()
                    return
                open_by_client[host] += 1
                self._counted = host
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._counted is not None:
                open_by_client[self._counted] -= 1
                if open_by_client[self._counted] <= 0:
                    del open_by_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of a request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._disarm()  # the whole request is in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle now: uvicorn's keep-alive timeout applies until the next byte

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE) and not (
                self.transport.is_closing()
            ):
                self.transport.close()  # the request did not arrive in time: drop the connection

    return GuardedH11Protocol
