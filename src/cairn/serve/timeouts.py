"""Slow clients are closed, not held: deadlines for a request's headers and for its body.

A connection that sends its headers a byte at a time, or a body slower than a minimum rate (or shorter than its
``Content-Length``), would otherwise hold a socket and a task for ever; a hundred such connections are a cheap way to
exhaust a server. Two guards, one per layer:

- **headers** (``header_guard``): a uvicorn HTTP protocol whose connections must deliver a whole request head within
  ``timeout`` seconds of connecting (or of the previous response on a keep-alive connection); otherwise the server
  answers 408 and closes the connection. Idle keep-alive connections are still closed earlier by uvicorn's own
  keep-alive timeout.
- **body** (``BodyDeadline``): the app's ``receive`` gets a deadline that grows with the bytes received: the body
  must arrive within ``timeout + bytes / min_rate`` seconds of its head. Past it the request gets 408.
"""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException as StarletteHTTPException

READ_TIMEOUT = 10.0  # seconds for a request head, and the base allowance for a body
MIN_BODY_RATE = 16 * 1024  # bytes per second a body must keep up beyond the base allowance

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s")
_TIMEOUT_BODY = (b'{"type":"error","error":{"type":"timeout_error","message":"the request head did not arrive '
                 b'within %g s: the connection was closed"}}')


class SlowBody(StarletteHTTPException):
    def __init__(self, received: int, elapsed: float, timeout: float, min_rate: float):
        super().__init__(408, f"the request body arrived too slowly ({received} bytes in {elapsed:.1f} s, or fewer "
                              f"than its Content-Length): send it within {timeout:g} s plus one second per "
                              f"{min_rate / 1024:g} KiB",
                         headers={"connection": "close"})


class BodyDeadline:
    """Wraps an ASGI ``receive``: each body chunk must arrive before ``start + timeout + received / min_rate``.

    After the last chunk the wrapper steps aside (``receive`` is then only waited on for a disconnect)."""

    def __init__(self, receive, timeout: float = READ_TIMEOUT, min_rate: float = MIN_BODY_RATE):
        self.receive, self.timeout, self.min_rate = receive, timeout, min_rate
        self.start = time.monotonic()
        self.received = 0
        self.done = False

    async def __call__(self):
        if self.done:
            return await self.receive()
        remaining = self.start + self.timeout + self.received / self.min_rate - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self.receive(), remaining)
        except TimeoutError:
            raise SlowBody(self.received, time.monotonic() - self.start, self.timeout, self.min_rate) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message


def header_guard(timeout: float = READ_TIMEOUT) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``uvicorn.Config(http=...)``) with a deadline on every request head; it also
    offers each request's transport to the app (``direct.expose``), for streamed tokens written around the loop."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from cairn.serve.direct import expose

    class HeaderDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _cairn_timer: asyncio.TimerHandle | None = None
        _cairn_seen = None  # the last request cycle whose head arrived

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._cairn_arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._cairn_check()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._cairn_check()
            if self.cycle is self._cairn_seen and not self.transport.is_closing():
                self._cairn_arm()  # waiting for the next request's head on a kept-alive connection

        def connection_lost(self, exc) -> None:
            self._cairn_disarm()
            super().connection_lost(exc)

        def _cairn_check(self) -> None:
            if self.cycle is not None and self.cycle is not self._cairn_seen:
                self._cairn_seen = self.cycle  # a new request's head is complete (its app task has not run yet)
                self._cairn_disarm()
                expose(self.cycle.scope, self.transport)

        def _cairn_arm(self) -> None:
            self._cairn_disarm()
            self._cairn_timer = self.loop.call_later(timeout, self._cairn_expire)

        def _cairn_disarm(self) -> None:
            if self._cairn_timer is not None:
                self._cairn_timer.cancel()
                self._cairn_timer = None

        def _cairn_expire(self) -> None:
            self._cairn_timer = None
            if self.transport.is_closing():
                return
            body = _TIMEOUT_BODY % timeout
            self.transport.write(_TIMEOUT_RESPONSE % (len(body), body))
            self.transport.close()

    return HeaderDeadlineProtocol
