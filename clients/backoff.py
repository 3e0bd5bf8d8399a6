"""Reconnect backoff: capped exponential growth with full jitter.

This module owns the reconnect schedule of :class:`clients.Client` and
nothing else; it performs no I/O and never sleeps. Randomness and time are
injected (``rng``, ``clock``) so the schedule is a pure, testable function of
its inputs.

"Full jitter" (the AWS Architecture Blog's "Exponential Backoff And Jitter"):
the delay before retry ``n`` (0-based) is drawn uniformly from
``[0, min(cap, base * 2**n)]``. Spreading each retry over the whole window,
not around its middle, is what keeps thousands of clients cut off at the
same instant (a server restart, a 1001 drain) from all coming back in the
same few milliseconds.

Consistency model: a :class:`Backoff` is mutable and owned by one client's
reconnect loop; :meth:`Backoff.reset` is called once a connection has been
accepted (READY), so a long healthy session starts the next outage at
attempt 0 again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: First window (seconds). Half a second is long enough to spread a crowd
#: and short enough that one reconnect after a deploy feels instantaneous.
DEFAULT_BASE = 0.5
#: Largest window (seconds): a client never waits longer than this between
#: two attempts, whatever the number of failures.
DEFAULT_CAP = 30.0
#: Exponent ceiling: 2**32 already exceeds any sensible cap / base ratio, and
#: bounding it keeps the float arithmetic finite after millions of attempts.
_MAX_EXPONENT = 32


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """The delay (seconds) before retry number ``attempt`` (0-based).

    Uniform in ``[0, min(cap, base * 2**attempt)]``. Raises ValueError for a
    negative attempt, base or cap.
    """
    if attempt < 0 or base < 0 or cap < 0:
        raise ValueError("attempt, base and cap must be >= 0")
    return rng.uniform(0.0, window(attempt, base, cap))


def window(attempt: int, base: float, cap: float) -> float:
    """The upper bound of retry ``attempt``'s delay: ``min(cap, base * 2**attempt)``."""
    return min(cap, base * (1 << min(attempt, _MAX_EXPONENT)))


@dataclass
class Backoff:
    """A reconnect schedule: exponential growth, full jitter, optional limits.

    Call :meth:`next_delay` after each failed attempt: it returns how long to
    wait before the next one, or ``None`` when the limits are exhausted (the
    caller must then give up). Call :meth:`reset` after a success.

    ``max_attempts`` bounds the number of delays handed out since the last
    reset (``None``: unbounded); ``max_elapsed`` bounds the seconds since the
    first failure after the last reset (``None``: unbounded).
    """

    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP
    max_attempts: int | None = None
    max_elapsed: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    #: Delays handed out since the last reset that grew the window (the
    #: exponent of the next one).
    attempt: int = field(default=0, init=False)
    #: Every delay handed out since the last reset, ``fixed`` ones included
    #: (what ``max_attempts`` bounds).
    handed: int = field(default=0, init=False)
    _started: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0:
            raise ValueError("base and cap must be >= 0")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError("max_attempts must be >= 0")

    def next_delay(self, floor: int = 0, fixed: float | None = None) -> float | None:
        """The delay before the next attempt, or None when the limits are reached.

        ``floor`` raises the attempt number used for the window (never lowers
        it): the caller passes a positive floor when the server asked it to
        back off (close 1013 or 4008) so it does not come back in the first,
        shortest window. ``fixed`` is a delay decided elsewhere (a refused
        connect, PROTOCOL.md "Pacing"): it is handed out as is, within the
        limits, and does not grow the window of the next one.
        """
        now = self.clock()
        if self._started is None:
            self._started = now
        if self.max_attempts is not None and self.handed >= self.max_attempts:
            return None
        if self.max_elapsed is not None and now - self._started >= self.max_elapsed:
            return None
        self.handed += 1
        if fixed is not None:
            delay = max(0.0, fixed)
        else:
            delay = full_jitter(max(self.attempt, floor), self.base, self.cap, self.rng)
            self.attempt += 1
        if self.max_elapsed is not None:
            # Never sleep past the deadline: the last attempt happens on it.
            delay = min(delay, max(0.0, self._started + self.max_elapsed - now))
        return delay

    def reset(self) -> None:
        """A connection succeeded: the next outage starts from attempt 0."""
        self.attempt = 0
        self.handed = 0
        self._started = None
