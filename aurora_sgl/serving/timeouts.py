"""Connection timeouts uvicorn does not have: a connection that never completes its request headers
(opened and left idle, or headers half sent) is closed after `HEADER_TIMEOUT_S`. uvicorn's own
keep-alive timer starts only after a first response, so such a connection stays open forever and
each one holds a socket and a task. Slow bodies are bounded where they are read
(`ServingContext.read_body`)."""

from __future__ import annotations

import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = float(os.environ.get("AURORA_SGL_HEADER_TIMEOUT_S") or 30.0)


class HeaderTimeoutH11Protocol(H11Protocol):
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._header_deadline)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None

    def _header_deadline(self) -> None:
        # IDLE: h11 has not seen a complete request head since the connection opened or the last
        # response; a request being answered or sending its body is in another state.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
