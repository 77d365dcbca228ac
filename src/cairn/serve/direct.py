"""Streamed tokens written by the engine thread straight to the client's socket, without waking the event loop.

Why: on a 2-core machine a decode step keeps both cores busy, and every thread that wakes during it stalls the whole
team of decode threads (they meet at some 180 barriers a step). The usual path of a streamed token (the engine
thread queues the event, the event loop wakes, takes the GIL, renders and sends the frame) lands in the next step:
measured, one `cairn serve` client got 0.88-0.93x of the in-process decode rate, and trimming the loop's Python by a
third did not move it (a minimal asyncio hop cost as much). Rendering the frame and sending it from the engine thread,
between its steps, costs one ``write`` there, and the client reads it while the engine thread's own Python runs.

How: the HTTP protocol (``timeouts.header_guard``'s class, which ``cairn serve`` runs) puts each request's transport
in its ASGI scope (``scope["extensions"]["cairn.transport"]``). A streamed response hands its token frames to the
engine thread (``Generation.next``) only while nothing else can write: the transport's buffer is empty (everything
the loop wrote is on the socket) and nothing is queued for the loop. The engine thread then writes each frame, in
HTTP/1.1 chunked framing, to its own duplicate of the socket (a closed and reused descriptor number can never get
another client's tokens), without blocking. Everything else — the head, opening and closing frames, pings, errors —
stays with the loop: a finish event, a frame the socket would not take whole (its rest is queued for the transport,
in order), or a failed write hands the stream back. Other servers (no transport in the scope), TLS, and HTTP/1.0
(not chunked) take the loop's path throughout.
"""

from __future__ import annotations

import os

TRANSPORT = "cairn.transport"  # the scope["extensions"] key


def expose(scope: dict, transport) -> None:
    """Called by the HTTP protocol for each new request: offer the connection's transport to the app when its
    response can be written around the loop (plain TCP, HTTP/1.1 chunked framing)."""
    if scope.get("http_version") == "1.1" and scope.get("method") != "HEAD" and \
            transport.get_extra_info("sslcontext") is None and transport.get_extra_info("socket") is not None:
        scope.setdefault("extensions", {})[TRANSPORT] = transport


def transport_of(request) -> object | None:
    """The request's transport if its stream may be written directly (see ``expose``), else None."""
    return (request.scope.get("extensions") or {}).get(TRANSPORT)


class DirectWriter:
    """Chunked frames written to a duplicate of a connection's socket, never blocking (the socket is the loop's,
    non-blocking). ``write`` returns what the socket did not take (b"" when all of it went; everything when the
    write failed, for the transport to send or to drop as the connection's state says)."""

    def __init__(self, transport):
        self.fd = os.dup(transport.get_extra_info("socket").fileno())

    def write(self, data: bytes) -> bytes:
        framed = b"%x\r\n%s\r\n" % (len(data), data)
        try:
            sent = os.write(self.fd, framed)
        except OSError:  # full (EAGAIN), or the peer is gone (EPIPE, ECONNRESET): the loop takes it from here
            sent = 0
        return framed[sent:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
