"""uvicorn with limits on connections, so that slow or idle clients cannot starve the others.

uvicorn closes a connection idle between requests after its keep-alive timeout, but it has no deadline for a
request's headers and no bound below the process's file-descriptor limit: 300 sockets that connect and send
nothing (or a header byte now and then) used to hold every descriptor, and the next client waited until they
left. GuardedH11Protocol adds both: a connection whose request headers are not complete within
HEADER_TIMEOUT_S is closed, and when more than max_connections are open, the longest-open idle one (no
request in progress) is closed to make room. The cap is also kept below the descriptor limit, leaving room
for the sockets accepted in one go.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import time
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import UserError

logger = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # from connecting (or the last answer) to the end of the next request's headers
KEEP_ALIVE_S = 5  # idle between two requests of one connection
FD_RESERVE = 32  # descriptors kept free for everything but client sockets (files, the model, logging)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and eviction of idle connections above max_connections."""

    def __init__(
        self, *args: Any, max_connections: int, header_timeout_s: float = HEADER_TIMEOUT_S, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.opened = time.monotonic()
        self._header_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """No request in progress: waiting for (the rest of) the next request's headers."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()
        open_now = [c for c in self.connections if getattr(c, "transport", None) and not c.transport.is_closing()]
        if len(open_now) > self.max_connections:
            idle = sorted(
                (c for c in open_now if c is not self and isinstance(c, GuardedH11Protocol) and c.idle),
                key=lambda c: c.opened,
            )
            for connection in idle[: len(open_now) - self.max_connections]:
                connection.close_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers have the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self.idle:  # still no complete request since the timer was armed
            self.close_idle()

    def close_idle(self) -> None:
        """Close this connection (it has no request in progress), as the keep-alive timeout does."""
        self.timeout_keep_alive_handler()


def connection_cap(max_connections: int) -> tuple[int, int]:
    """(connections, accept batch) that fit the descriptors this process has left; UserError when too few.

    asyncio accepts up to `backlog` pending sockets in one go before any of them can be evicted, so the cap
    leaves two such batches of descriptors free, and the batch shrinks with the limit.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))
    except OSError:  # neither listing exists: the reserve has to cover them
        in_use = 0
    free = (soft if soft != resource.RLIM_INFINITY else 1 << 20) - in_use - FD_RESERVE
    batch = max(8, min(2048, free // 8))
    cap = min(max_connections, free - 2 * batch)
    if cap < 8:
        raise UserError(
            f"only {free + FD_RESERVE} file descriptors are left to this process (ulimit -n {soft}); "
            "raise the limit (ulimit -n 4096) to serve."
        )
    return cap, batch


def run_server(
    app: Any,
    host: str,
    port: int,
    max_connections: int,
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    log: Callable[[str], None] = logger.info,
) -> None:
    """Serve app with uvicorn (h11) on host:port until Ctrl-C, with the timeouts and the connection cap above."""
    import uvicorn

    cap, batch = connection_cap(max_connections)
    if cap < max_connections:
        log(
            f"note: serving at most {cap} connections at once (--max-connections {max_connections} is more than "
            "the file-descriptor limit allows)"
        )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=functools.partial(  # type: ignore[arg-type]
            GuardedH11Protocol, max_connections=cap, header_timeout_s=header_timeout_s
        ),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=cap + batch,  # a backstop (503) for when every connection is busy: closing ones count
        backlog=batch,
    )
