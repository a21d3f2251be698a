"""The HTTP protocol the server speaks: uvicorn's h11, sending each response in one write.

A module-level class, named to uvicorn by its import string, so that `--workers N` can hand it
to worker processes (a class made inside a function cannot be pickled into them).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

IMPORT_STRING = "app.protocol:CoalescingH11Protocol"


class CoalescingTransport:
    """Collects the writes of one event-loop turn and sends them as one: uvicorn writes a
    response's head and body separately, and a replica killed between the two leaves the load
    balancer holding a response head it can no longer retry. One write leaves no such gap."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol writing each response (head + body) in a single send."""

    def connection_made(self, transport: Any) -> None:
        wrapped: Any = CoalescingTransport(transport, self.loop)
        super().connection_made(wrapped)
