"""Admission control of one node's gateway (PROTOCOL.md "Pacing: retry
hints and staggered RECONNECT"; docs/OPERATIONS.md "Deploying without a
reconnect storm").

Owns two token buckets, refilled continuously, both starting full, and the
queue of IDENTIFYs waiting for the first:

- **IDENTIFYs** at ``rate`` per second (``Config.admit_rate``), burst one
  second's worth. A session coming back with a Position (a resume: cheap,
  served from history, and its user is waiting for the events it missed)
  may take any token; a fresh session only while more than
  ``FRESH_RESERVE`` of the burst is left, so in a storm resumes are
  admitted first and fresh sessions wait.
- **Handshakes** (WebSocket upgrades) at ``HANDSHAKE_FACTOR`` x ``rate``:
  at upgrade time we cannot yet tell a resume from a fresh session, so this
  bound only stops a flood of upgrades from starving the IDENTIFYs of
  what they need.

An IDENTIFY that finds no token **waits** (its connection stops being
read), resumes in one queue, fresh sessions in another, and is served in
that order as tokens come: a refused session would come back and cost its
handshake again, a waiting one costs nothing but its place. The queue is
bounded: at most ``QUEUE_SECONDS`` of ``rate`` sessions wait, for at most
``MAX_WAIT`` seconds. Past either bound a session is refused: close 1013
whose reason carries a retry hint
(:func:`guildcast.protocol.hints.retry_reason`): the wait until this class
of session would find room, plus a spread as wide as the crowd refused in
the last second takes to admit at the current rate, so the clients refused
together come back spread out, not together.

Both rates follow the node's event-loop lag (``loop_lag``, measured by the
gateway's sweeper every ``sweep_interval``): past ``LAG_TARGET`` the node
is behind its live traffic and the admitted share of ``rate`` is halved
(down to ``MIN_SHARE``); while it keeps up the share grows back by
``SHARE_STEP`` a sweep. Live traffic of connected sessions is never
refused here: only handshakes and IDENTIFYs are counted.

Consistency model: one instance per gateway, used only from its event
loop; time is passed in (monotonic seconds). A waiter that closed while
queued is dropped when reached and takes no token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from guildcast.core.metrics import MetricsSnapshot
from guildcast.protocol.hints import MAX_HINT_MS, retry_reason

__all__ = ["QUEUED", "Admission", "AdmissionStats", "Waiter"]

#: Share of the IDENTIFY burst held back for resumes: a fresh session is
#: refused once the bucket is below it, a resume only once it is empty.
FRESH_RESERVE = 0.5
#: Handshakes allowed per IDENTIFY allowed: every admitted session needs
#: one handshake, and a refused one usually comes back once.
HANDSHAKE_FACTOR = 2.0
#: Seconds of ``rate`` that may wait in the queue (its length bound).
QUEUE_SECONDS = 2.0
#: Seconds an IDENTIFY may wait for its token: well inside the 10-second
#: IDENTIFY deadline, and short enough that a refused one still has time
#: to come back within its hint.
MAX_WAIT = 3.0
#: Seconds of refusals remembered to size the spread of the hint.
CROWD_WINDOW = 1.0
#: The narrowest spread a hint gives (ms): below it, clients refused in the
#: same millisecond would come back in the same millisecond.
MIN_SPREAD_MS = 250
#: Event-loop lag (s) past which admissions slow down: well above what a
#: busy node's live traffic alone causes (tens of ms on a shared 2-core
#: machine), so only a node swamped by new sessions backs off.
LAG_TARGET = 0.25
#: The least share of ``rate`` admitted however late the loop is: the
#: storm still drains, at half the rate (a late loop on a machine busy
#: with other work is not ours to fix by refusing everyone).
MIN_SHARE = 0.5
#: Share regained per sweep on time (0.5 s).
SHARE_STEP = 0.1

#: :meth:`Admission.arrive`'s answer for an IDENTIFY put in the queue.
QUEUED = "queued"


class Waiter(Protocol):
    """A connection whose IDENTIFY waits in the queue."""

    closing: bool


@dataclass(slots=True)
class AdmissionStats:
    """Counters since start (``Gateway.stats``)."""

    admitted_resume: int = 0
    admitted_fresh: int = 0
    queued_resume: int = 0
    queued_fresh: int = 0
    refused_resume: int = 0
    refused_fresh: int = 0
    refused_handshake: int = 0
    #: Sweeps that found the loop late and halved the admitted share.
    slowdowns: int = 0


class _Bucket:
    __slots__ = ("at", "cap", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.cap = max(rate, 1.0)
        self.tokens = self.cap
        self.at = now

    def level(self, now: float) -> float:
        self.tokens = min(self.cap, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens


class Admission:
    """Bounds handshakes and IDENTIFYs per second; ``rate <= 0`` admits all."""

    __slots__ = (
        "_crowd",
        "_crowd_at",
        "_fresh",
        "_hs",
        "_id",
        "_resumes",
        "max_waiting",
        "rate",
        "share",
        "stats",
    )

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.stats = AdmissionStats()
        self._id = _Bucket(rate, now) if rate > 0 else None
        self._hs = _Bucket(rate * HANDSHAKE_FACTOR, now) if rate > 0 else None
        #: Waiting IDENTIFYs, oldest first: ``(since, waiter)``.
        self._resumes: deque[tuple[float, Waiter]] = deque()
        self._fresh: deque[tuple[float, Waiter]] = deque()
        self.max_waiting = max(1, int(rate * QUEUE_SECONDS))
        #: Refusals within the current crowd window, and when it opened.
        self._crowd = 0
        self._crowd_at = now
        #: Share of ``rate`` admitted now (``loop_lag``), in [MIN_SHARE, 1].
        self.share = 1.0

    @property
    def waiting(self) -> int:
        return len(self._resumes) + len(self._fresh)

    @property
    def current_rate(self) -> float:
        """IDENTIFYs admitted per second now: ``rate`` times the share the
        loop lag leaves (:meth:`loop_lag`); 0 when there is no bound."""
        return self.rate * self.share if self._id is not None else 0.0

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics`` (through the gateway): the counters since start,
        the current rate and the queue's depth (docs/OPERATIONS.md)."""
        st = self.stats
        m.admission_admitted = {"resume": st.admitted_resume, "fresh": st.admitted_fresh}
        m.admission_queued = {"resume": st.queued_resume, "fresh": st.queued_fresh}
        m.admission_refused = {
            "resume": st.refused_resume,
            "fresh": st.refused_fresh,
            "handshake": st.refused_handshake,
        }
        m.admission_slowdowns = st.slowdowns
        m.admission_rate = self.current_rate
        m.admission_waiting = self.waiting

    def loop_lag(self, lag: float) -> None:
        """The event loop was ``lag`` s late: slow down (halve the share) or
        speed up again (one step back toward the full rate)."""
        if self._id is None or self._hs is None:
            return
        if lag > LAG_TARGET:
            self.share = max(MIN_SHARE, self.share / 2)
            self.stats.slowdowns += 1
        else:
            self.share = min(1.0, self.share + SHARE_STEP)
        self._id.rate = self.rate * self.share
        self._hs.rate = self.rate * HANDSHAKE_FACTOR * self.share

    def handshake(self, now: float) -> str | None:
        """None to go on with an upgraded connection, else the close reason (1013)."""
        b = self._hs
        if b is None or b.level(now) >= 1.0:
            if b is not None:
                b.tokens -= 1.0
            return None
        self.stats.refused_handshake += 1
        return self._refusal("too many connections at once", (1.0 - b.tokens) / b.rate, now)

    def _need(self, resume: bool) -> float:
        b = self._id
        assert b is not None
        # A fresh session leaves the reserve untouched (of a burst of one,
        # nothing can be reserved: then both classes are alike).
        return 1.0 if resume else 1.0 + FRESH_RESERVE * (b.cap - 1.0)

    def _take(self, resume: bool, now: float) -> bool:
        b = self._id
        assert b is not None
        if b.level(now) < self._need(resume):
            return False
        b.tokens -= 1.0
        if resume:
            self.stats.admitted_resume += 1
        else:
            self.stats.admitted_fresh += 1
        return True

    def identify(self, resume: bool, now: float) -> str | None:
        """Admit now (None) or refuse (the close reason, 1013, with its
        retry hint): the policy without the queue."""
        st = self.stats
        if self._id is None:
            if resume:
                st.admitted_resume += 1
            else:
                st.admitted_fresh += 1
            return None
        if self._take(resume, now):
            return None
        return self._refuse(resume, now)

    def arrive(self, waiter: Waiter, resume: bool, now: float) -> str | None:
        """An IDENTIFY arrives: None to serve it now, :data:`QUEUED` if it
        waits (:meth:`due` hands it back), else the close reason (1013)."""
        if self._id is None:
            return self.identify(resume, now)
        ahead = self._resumes if resume else self.waiting
        if not ahead and self._take(resume, now):
            return None
        if self.waiting >= self.max_waiting:
            return self._refuse(resume, now)
        (self._resumes if resume else self._fresh).append((now, waiter))
        if resume:
            self.stats.queued_resume += 1
        else:
            self.stats.queued_fresh += 1
        return QUEUED

    def due(self, now: float) -> tuple[list[Waiter], list[tuple[Waiter, str]]]:
        """Waiters admitted now (resumes first), and those that waited past
        ``MAX_WAIT``, each with its close reason (1013 and a retry hint)."""
        admitted: list[Waiter] = []
        refused: list[tuple[Waiter, str]] = []
        for q, resume in ((self._resumes, True), (self._fresh, False)):
            while q:
                since, w = q[0]
                if w.closing:
                    q.popleft()
                    continue
                if now - since > MAX_WAIT:
                    q.popleft()
                    refused.append((w, self._refuse(resume, now)))
                    continue
                if (not resume and self._resumes) or not self._take(resume, now):
                    break
                q.popleft()
                admitted.append(w)
        return admitted, refused

    def next_due(self, now: float) -> float:
        """Seconds until :meth:`due` may have something to hand back."""
        b = self._id
        if b is None or not self.waiting:
            return MAX_WAIT
        need = self._need(bool(self._resumes))
        return max(0.001, min(MAX_WAIT, (need - b.level(now)) / b.rate))

    def _refuse(self, resume: bool, now: float) -> str:
        b = self._id
        assert b is not None
        if resume:
            self.stats.refused_resume += 1
        else:
            self.stats.refused_fresh += 1
        backlog = self.waiting / b.rate
        wait = max(0.0, (self._need(resume) - b.level(now)) / b.rate) + backlog
        return self._refusal("server busy", wait, now)

    def _refusal(self, why: str, wait: float, now: float) -> str:
        if now - self._crowd_at >= CROWD_WINDOW:
            self._crowd_at = now
            self._crowd = 0
        self._crowd += 1
        lo = int(wait * 1000) + 1
        spread = max(MIN_SPREAD_MS, int(1000 * self._crowd / max(self.rate * self.share, 1.0)))
        return retry_reason(why, lo, min(MAX_HINT_MS, lo + spread))
