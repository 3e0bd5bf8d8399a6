"""The actor runtime: one asyncio task draining a mailbox.

An :class:`Actor` owns its state; nobody else touches it. Others talk to it
with :meth:`Actor.cast` (no reply) or :meth:`Actor.call` (a reply or
:class:`CallTimeout`). Consistency model: messages from one sender are
handled in the order they were cast; there is no order across senders.

Mailbox bound and overflow policy: :meth:`cast` refuses with
:class:`MailboxFull` once ``mailbox_bound`` messages wait (callers turn this
into "try again later"); :meth:`cast_system` is for control messages whose
number is bounded elsewhere (one per subscription change) and must never be
dropped, so it ignores the bound. Casting to an actor that has exited is a
silent no-op, as sending to a dead process is in Erlang; calling one raises
:class:`ActorExited`.

Life cycle: ``start`` -> ``on_start`` -> batches -> (``stop`` | idle |
crash) -> ``on_stop`` -> exit hooks and monitors. An exception from a
handler is logged and ends the actor (let it crash); its exit hooks run
(the registry unregisters it, groups drop it) and its monitors are told why.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from guildcast.core.failures import Failure, Kind, Overloaded

log = logging.getLogger("guildcast.actors")

#: Default mailbox bound: a burst this long is absorbed; past it senders are
#: told to retry, so memory stays bounded whatever publishers do.
DEFAULT_MAILBOX_BOUND = 10_000


class MailboxFull(Overloaded):
    """The actor's mailbox is at its bound; try again later."""

    kind = Kind.MAILBOX_FULL


class ActorExited(Failure):
    """The actor has exited, or exited before answering a call."""

    kind = Kind.ACTOR_EXITED


class CallTimeout(TimeoutError, Failure):
    """No reply within the call's timeout."""

    kind = Kind.CALL_TIMEOUT


class Reply:
    """A call's answer handed to a plain callback, ``fn(result, error)``,
    in the actor's own step, instead of a Future's done-callback in a later
    loop iteration: no Future, no ``call_soon`` handle, no extra loop turn
    per call (the gateway's PUBLISH answers, :meth:`Actor.call_with`).

    Answered at most once, as a Future is: ``done()`` says whether it was.
    ``fn`` must not block or await, and may not raise into the actor: an
    exception from it is logged and the actor goes on.
    """

    __slots__ = ("_done", "fn")

    def __init__(self, fn: Callable[[Any, BaseException | None], None]) -> None:
        self.fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._answer(result, None)

    def set_exception(self, exc: BaseException) -> None:
        self._answer(None, exc)

    def _answer(self, result: Any, exc: BaseException | None) -> None:
        if self._done:
            raise asyncio.InvalidStateError("reply already given")
        self._done = True
        try:
            self.fn(result, exc)
        except Exception:
            log.exception("reply callback failed")


class _Call:
    __slots__ = ("future", "msg")

    def __init__(self, msg: Any, future: asyncio.Future[Any] | Reply) -> None:
        self.msg = msg
        self.future = future


class _Stop:
    __slots__ = ()


_STOP = _Stop()

#: What the idle timer resolves an idle actor's waiter with (``cast`` uses None).
_IDLE = object()
#: Timers may fire up to the loop's clock resolution (uvloop: 1 ms) early;
#: an idle check this close to ``_idle_at`` counts as on time, not as a
#: reason to set the timer again.
_IDLE_SLACK = 0.001

#: ``monitor(actor, reason)``: reason is None for a normal exit, else the exception.
Monitor = Callable[["Actor", BaseException | None], None]


class Actor:
    """Base class: override :meth:`handle` (or :meth:`handle_batch` for speed)."""

    def __init__(
        self,
        name: str,
        *,
        mailbox_bound: int = DEFAULT_MAILBOX_BOUND,
        idle_timeout: float | None = None,
    ) -> None:
        self.name = name
        self.mailbox_bound = mailbox_bound
        self.idle_timeout = idle_timeout
        self._mailbox: deque[Any] = deque()
        self._waiter: asyncio.Future[object] | None = None
        #: Idle detection (``idle_timeout``): one timer per idle period, not one
        #: per wait. Each wait moves ``_idle_at``; when the timer fires early
        #: (messages came since) it is set again for the new ``_idle_at``.
        self._idle_at = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._exited = False
        #: True while :meth:`step_now` runs a step on a caller's stack.
        self._stepping = False
        #: True once ``on_stop`` has returned and the exit hooks have run (or
        #: are running): the actor is gone, not merely exiting.
        self._finished = False
        self._finished_waiter: asyncio.Future[None] | None = None
        self._exit_hooks: list[Callable[[object], None]] = []
        self._monitors: list[Monitor] = []
        self.exit_reason: BaseException | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # --- life cycle ----------------------------------------------------------

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Start the actor's task in ``tg`` (its owner). Call once."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} already started")
        self._task = tg.create_task(self._run(), name=f"actor:{self.name}")

    @property
    def alive(self) -> bool:
        """False from the moment the actor stops taking messages (while its
        ``on_stop`` still runs, too)."""
        return not self._exited

    @property
    def has_finished(self) -> bool:
        """True once ``on_stop`` has returned and the exit hooks have run."""
        return self._finished

    @property
    def has_started(self) -> bool:
        """True once :meth:`start` has been called."""
        return self._task is not None

    @property
    def mailbox_depth(self) -> int:
        return len(self._mailbox)

    @property
    def parked(self) -> bool:
        """True while the actor waits for mail with nothing queued (and so
        is in no batch): a message handled for it now, synchronously, is
        handled exactly as its next batch would handle it."""
        return self._waiter is not None and not self._mailbox and not self._exited

    def step_now(self, fn: Callable[[], bool]) -> bool:
        """Run ``fn`` now, on the caller's stack, as this actor's next step,
        if the actor is :attr:`parked` (and not already in such a step): it
        then sees exactly the state its next batch would, and nothing else
        of the actor runs meanwhile (one event loop). Saves the wake of the
        actor's task, a Future and the task step per message.

        Returns False, having run nothing, when the actor is not parked;
        else what ``fn`` returns (False: ``fn`` changed nothing and the
        caller casts the message instead). ``fn`` must not await. An
        exception from it crashes the actor as one from a batch would
        (logged, ``on_stop``, exit hooks, monitors) and is not re-raised:
        the caller answers its own message (:class:`ActorExited`)."""
        w = self._waiter
        if w is None or self._mailbox or self._exited or self._stepping:
            return False
        self._stepping = True
        try:
            return fn()
        except Exception as e:
            self.kill(e)
            return True
        finally:
            self._stepping = False
            if self.idle_timeout is not None:
                self._idle_at = w.get_loop().time() + self.idle_timeout

    def stop(self) -> None:
        """Ask the actor to exit normally after what is already queued."""
        if not self._exited:
            self._mailbox.append(_STOP)
            self._wake()

    def kill(self, reason: BaseException) -> None:
        """Make the actor exit abnormally with ``reason`` as soon as it runs."""
        if not self._exited:
            self._mailbox.appendleft(_Kill(reason))
            self._wake()

    async def wait(self) -> None:
        """Wait until the actor has exited and its ``on_stop`` has returned.

        An actor that is never started never exits: only wait for one that was
        started, or that a :class:`~guildcast.actors.registry.Registry` will start.
        """
        if self._finished:
            return
        if self._finished_waiter is None:
            self._finished_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._finished_waiter)

    def discard(self, reason: BaseException) -> None:
        """End an actor that was never started (its owner could not start it):
        queued calls fail with :class:`ActorExited`, exit hooks and monitors run."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} was started; stop or kill it instead")
        if not self._finished:
            self._exited = True
            self.exit_reason = reason
            self._finish(reason)

    def add_exit_hook(self, hook: Callable[[object], None]) -> None:
        """Call ``hook(self)`` once the actor has exited and its ``on_stop``
        has returned (at once if that has happened)."""
        if self._finished:
            hook(self)
        else:
            self._exit_hooks.append(hook)

    def monitor(self, fn: Monitor) -> None:
        """Call ``fn(self, reason)`` once the actor has exited and its
        ``on_stop`` has returned (at once if that has happened)."""
        if self._finished:
            fn(self, self.exit_reason)
        else:
            self._monitors.append(fn)

    # --- messaging -----------------------------------------------------------

    def cast(self, msg: Any) -> None:
        """Queue ``msg`` without waiting; raises :class:`MailboxFull` past the bound."""
        if self._exited:
            return
        if len(self._mailbox) >= self.mailbox_bound:
            raise MailboxFull(f"{self.name}: mailbox full ({self.mailbox_bound} queued)")
        self._mailbox.append(msg)
        w = self._waiter
        if w is not None:
            self._waiter = None
            w.set_result(None)

    def cast_system(self, msg: Any) -> None:
        """Queue a control message that must not be dropped (ignores the bound)."""
        if self._exited:
            return
        self._mailbox.append(msg)
        w = self._waiter
        if w is not None:
            self._waiter = None
            w.set_result(None)

    def call_nowait(self, msg: Any) -> asyncio.Future[Any]:
        """Queue ``msg`` as a call and return the future of its reply.

        Raises :class:`MailboxFull` past the bound and :class:`ActorExited` if
        the actor has exited; the future fails with :class:`ActorExited` if it
        exits before replying.
        """
        if self._exited:
            raise ActorExited(self.name)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.cast(_Call(msg, fut))
        return fut

    def call_with(self, msg: Any, fn: Callable[[Any, BaseException | None], None]) -> None:
        """Queue ``msg`` as a call whose reply goes to ``fn(result, error)``
        in this actor's step (:class:`Reply`). Raises :class:`MailboxFull`
        and :class:`ActorExited` as :meth:`call_nowait` does; ``fn`` gets
        :class:`ActorExited` if the actor exits before replying."""
        if self._exited:
            raise ActorExited(self.name)
        self.cast(_Call(msg, Reply(fn)))

    async def call(self, msg: Any, timeout: float = 5.0) -> Any:
        """Send ``msg`` and wait for the reply; raises :class:`CallTimeout`."""
        fut = self.call_nowait(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CallTimeout(f"{self.name}: no reply within {timeout} s") from None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            w.set_result(None)

    def _idle_check(self) -> None:
        """The idle timer: wake the actor with ``_IDLE`` if it has been waiting
        since ``_idle_at``; else (busy, or woken since) check again later."""
        self._idle_timer = None
        if self._exited or self.idle_timeout is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        w = self._waiter
        if w is None or now < self._idle_at - _IDLE_SLACK:
            at = self._idle_at if w is not None else now + self.idle_timeout
            self._idle_timer = loop.call_at(at, self._idle_check)
            return
        self._waiter = None
        w.set_result(_IDLE)

    # --- to override ---------------------------------------------------------

    async def on_start(self) -> None:
        """Runs in the actor's task before the first message."""

    async def on_stop(self, reason: BaseException | None) -> None:
        """Runs in the actor's task after the last message (also after a crash)."""

    def on_idle(self) -> bool:
        """No message for ``idle_timeout`` s: return True to stop (the default)."""
        return True

    async def handle(self, msg: Any) -> Any:
        """Handle one message; the return value answers a :meth:`call`."""
        raise NotImplementedError

    async def handle_batch(self, batch: deque[Any]) -> None:
        """Handle every message queued since the last batch, in order."""
        for item in batch:
            if type(item) is _Call:
                fut = item.future
                try:
                    result = await self.handle(item.msg)
                except Exception as e:
                    if not fut.done():
                        fut.set_exception(e)
                    raise
                if not fut.done():
                    fut.set_result(result)
            else:
                await self.handle(item)

    # --- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        reason: BaseException | None = None
        loop = asyncio.get_running_loop()
        batch: deque[Any] = deque()
        try:
            await self.on_start()
            while True:
                if not self._mailbox:
                    w = self._waiter = loop.create_future()
                    if self.idle_timeout is not None:
                        self._idle_at = loop.time() + self.idle_timeout
                        if self._idle_timer is None:
                            self._idle_timer = loop.call_at(self._idle_at, self._idle_check)
                    if await w is _IDLE:
                        if not self._mailbox and self.on_idle():
                            break
                        continue
                batch = self._mailbox
                self._mailbox = deque()
                stop = _take_control(batch, self._mailbox)
                if batch:
                    await self.handle_batch(batch)
                if stop is not None:
                    if isinstance(stop, _Kill):
                        raise stop.reason
                    break
        except asyncio.CancelledError:
            reason = None
            raise
        except Exception as e:
            reason = e
            log.error("actor %r crashed", self.name, exc_info=e)
        finally:
            self._exited = True
            self.exit_reason = reason
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            try:
                await self.on_stop(reason)
            except Exception:
                log.exception("actor %r failed in on_stop", self.name)
            # Calls of the batch in hand when the actor ended (behind a crashing
            # message, say) fail with ActorExited like the queued ones.
            self._mailbox.extendleft(reversed(batch))
            self._finish(reason)

    def _finish(self, reason: BaseException | None) -> None:
        self._finished = True
        if self._finished_waiter is not None and not self._finished_waiter.done():
            self._finished_waiter.set_result(None)
        for item in self._mailbox:
            if type(item) is _Call and not item.future.done():
                item.future.set_exception(ActorExited(self.name))
        self._mailbox.clear()
        hooks, self._exit_hooks = self._exit_hooks, []
        for hook in hooks:
            try:
                hook(self)
            except Exception:
                log.exception("exit hook of %r failed", self.name)
        monitors, self._monitors = self._monitors, []
        for fn in monitors:
            try:
                fn(self, reason)
            except Exception:
                log.exception("monitor of %r failed", self.name)


class _Kill:
    __slots__ = ("reason",)

    def __init__(self, reason: BaseException) -> None:
        self.reason = reason


def _take_control(batch: deque[Any], leftover: deque[Any]) -> _Stop | _Kill | None:
    """Cut ``batch`` at the first stop/kill and return it; what follows moves to
    ``leftover`` (the actor exits, and pending calls there fail with ActorExited)."""
    if batch and type(batch[0]) is _Kill:
        k: _Kill = batch.popleft()
        leftover.extend(batch)
        batch.clear()
        return k
    for i, item in enumerate(batch):
        if type(item) is _Stop:
            while len(batch) > i + 1:
                leftover.appendleft(batch.pop())
            batch.pop()
            return _STOP
    return None
