"""Noticing that the process has run out of file descriptors.

When a listener cannot accept because the process is at ``RLIMIT_NOFILE``
(EMFILE), the gateway's acceptor (``guildcast.transport.acceptor``) turns
the connection away through a descriptor it keeps in reserve; a journal or
an HTTP API connection that cannot be opened fails on its own. Without this
module, the operator would see no log line and no metric for either.

:class:`DescriptorWatch` is told by the acceptor (:meth:`~DescriptorWatch.note`)
and probes at most once per :data:`PROBE_INTERVAL` (one ``open`` and
``close`` of ``/dev/null``, called from the gateway's sweeper): either way
a moment without descriptors counts in :attr:`DescriptorWatch.exhausted`
(``guildcast_descriptors_exhausted_total``) and logs one rate-limited ERROR
that says what to do. State: two numbers and the rate limiter's one entry;
no queue.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

from guildcast.core.ratelog import RateLimitedLog

log = logging.getLogger("guildcast.gateway")
_flood = RateLimitedLog(log)

#: Seconds between two probes: a second of dropped connections is noticed,
#: at the cost of two system calls a second.
PROBE_INTERVAL = 1.0
#: Descriptors a node needs besides its connections (listeners, journals,
#: the event loop, HTTP API clients): the start-up warning compares
#: ``max_connections`` plus this with the limit.
RESERVED = 64
#: The errors of a process (EMFILE) or a machine (ENFILE) out of descriptors.
_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_descriptors() -> int:
    """Descriptors the process holds now (-1 where /proc is not available)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own
    except OSError:
        return -1


class DescriptorWatch:
    """Counts and logs the moments the process has no descriptor left."""

    __slots__ = ("_next", "exhausted")

    def __init__(self) -> None:
        #: Probes that found no descriptor left.
        self.exhausted = 0
        self._next = 0.0

    @staticmethod
    def warn_if_short(max_connections: int) -> None:
        """Log a warning at start if the limit cannot hold ``max_connections``."""
        limit = soft_limit()
        if limit != resource.RLIM_INFINITY and max_connections + RESERVED > limit:
            log.warning(
                "the descriptor limit (%d, ulimit -n) is below --max-connections (%d) plus "
                "%d for the node itself: past it new connections are dropped",
                limit,
                max_connections,
                RESERVED,
                extra={"limit": limit, "max_connections": max_connections},
            )

    def note(self, code: int) -> None:
        """A connection could not be accepted for want of a descriptor
        (``code``: EMFILE or ENFILE): count and log it (rate-limited)."""
        self.exhausted += 1
        self._log(code)

    def _log(self, code: int) -> None:
        _flood.log(
            logging.ERROR,
            "descriptors_exhausted",
            "out of file descriptors (limit %d): new connections are being dropped; "
            "raise the limit (ulimit -n, systemd LimitNOFILE=) or lower --max-connections",
            soft_limit(),
            extra={"limit": soft_limit(), "errno": code},
        )

    def check(self, now: float) -> bool:
        """Probe (at most once per interval); True if no descriptor was left."""
        if now < self._next:
            return False
        self._next = now + PROBE_INTERVAL
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in _EXHAUSTED:
                return False
            self.exhausted += 1
            self._log(e.errno)
            return True
        os.close(fd)
        return False
