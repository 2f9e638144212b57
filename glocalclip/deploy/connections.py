"""The HTTP server around the app: uvicorn with a deadline on each request's headers.

uvicorn closes an idle kept-alive connection (``timeout_keep_alive``) and the app bounds a body's
time (``uploads.py``), but nothing bounds the header phase: a client that sends part of a request
line and then stalls holds its connection and a file descriptor for as long as it likes, and a few
hundred such clients ("slowloris") starve the server. The protocol made here is uvicorn's h11
protocol with one addition: a connection whose request headers are not complete within
``header_timeout_s`` of its opening, or of its previous answer, is closed (docs/usage.md, "Security:
the server"). uvicorn is the serve extra's: it is imported when a server is configured, so that
``glocalclip serve --help`` and the error for a missing extra need none of it.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from .serve import ServeSettings

#: an idle kept-alive connection is closed after this many seconds (uvicorn's own timer)
KEEP_ALIVE_S = 5


def protocol_with_header_deadline(seconds: float) -> type:
    """uvicorn's h11 protocol class, with ``seconds`` (> 0) for the headers of each request."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        header_timeout_s = float(seconds)
        _header_deadline: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            if not self.transport.is_closing():
                self._header_deadline = self.loop.call_later(self.header_timeout_s, self._on_header_deadline)

        def _cancel_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _on_header_deadline(self) -> None:
            """Close the connection unless a request's headers arrived since the deadline was
            armed (that request is being answered, and its answer arms the next deadline)."""
            self._header_deadline = None
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


def server_config(app: Any, settings: ServeSettings, **overrides: Any):
    """The ``uvicorn.Config`` that ``glocalclip serve`` runs ``app`` with (``overrides``: e.g. port 0
    or the log level in tests)."""
    import uvicorn

    options: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level="info",
                                   timeout_keep_alive=KEEP_ALIVE_S)
    if settings.header_timeout_s > 0:
        options["http"] = protocol_with_header_deadline(settings.header_timeout_s)
    return uvicorn.Config(app, **{**options, **overrides})
