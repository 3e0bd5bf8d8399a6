"""The failure table (core/failures.py): each runtime failure, raised by the
layer that owns it, gets the answer docs/PROTOCOL.md gives it on both
transports (gateway ERROR code; HTTP status, ``error``, outcome,
``Retry-After``)."""

from __future__ import annotations

import asyncio

import pytest

from guildcast.actors.actor import ActorExited, CallTimeout, MailboxFull
from guildcast.actors.registry import RegistryFull
from guildcast.broker.base import BrokerUnavailable
from guildcast.broker.base import OutcomeUnknown as BrokerOutcomeUnknown
from guildcast.core import failures
from guildcast.core.failures import KeyConflict, Kind, OutcomeUnknown, Overloaded

RETRY = (1013, 503, "unavailable", "not_published", {"Retry-After": "1"})
UNKNOWN = (4504, 504, "outcome_unknown", "unknown", None)

ROWS: list[tuple[BaseException, Kind, tuple[object, ...]]] = [
    (Overloaded("your subscriptions hold 3 guilds"), Kind.OVERLOADED, RETRY),
    (MailboxFull("g: mailbox full"), Kind.MAILBOX_FULL, RETRY),
    (ActorExited("g"), Kind.ACTOR_EXITED, RETRY),
    (RegistryFull("1000 actors alive"), Kind.REGISTRY_FULL, RETRY),
    (CallTimeout("g: no reply within 5 s"), Kind.CALL_TIMEOUT, RETRY),
    (BrokerUnavailable("redis is unreachable"), Kind.BROKER_UNAVAILABLE, RETRY),
    (BrokerOutcomeUnknown("redis: no answer"), Kind.OUTCOME_UNKNOWN, UNKNOWN),
    (OutcomeUnknown("no answer"), Kind.OUTCOME_UNKNOWN, UNKNOWN),
    (
        KeyConflict(7, "e1"),
        Kind.KEY_CONFLICT,
        (4409, 409, "idempotency_conflict", "not_published", None),
    ),
    (asyncio.CancelledError(), Kind.CANCELLED, RETRY),
    (ValueError("invalid guild id"), Kind.INVALID, (4002, 400, "bad_shape", "not_published", None)),
    (RuntimeError("a bug"), Kind.UNEXPECTED, (1013, 500, "internal_error", "not_published", None)),
]


@pytest.mark.parametrize(("exc", "kind", "expected"), ROWS, ids=[k.value for _, k, _ in ROWS])
def test_each_failure_has_its_answer(
    exc: BaseException, kind: Kind, expected: tuple[object, ...]
) -> None:
    a = failures.answer(exc)
    assert failures.kind_of(exc) is kind
    assert a.kind is kind
    assert (a.error_code, a.status, a.error, a.outcome, a.headers) == expected


def test_every_kind_has_a_row() -> None:
    assert set(failures.ANSWERS) == set(Kind)
    for kind, a in failures.ANSWERS.items():
        assert a.kind is kind


def test_only_an_unknown_outcome_is_not_a_refusal() -> None:
    """PROTOCOL.md "Publishing": every code but 4504 / HTTP 504 is "not published"."""
    for a in failures.ANSWERS.values():
        assert (a.outcome == "unknown") == (a.error_code == 4504) == (a.status == 504)


def test_the_broker_outcome_unknown_is_not_answered_as_unavailable() -> None:
    """It is a BrokerUnavailable (nothing else need catch it apart) whose row
    is its own: never "refused, retry"."""
    exc = BrokerOutcomeUnknown("late")
    assert isinstance(exc, BrokerUnavailable) and isinstance(exc, OutcomeUnknown)
    assert failures.answer(exc).error_code == 4504


def test_busy_failures_are_overloaded_for_embedders() -> None:
    """``Server.publish`` documents Overloaded when busy: a full mailbox and a
    full registry still are."""
    assert isinstance(MailboxFull("g"), Overloaded)
    assert isinstance(RegistryFull("n"), Overloaded)
    assert isinstance(CallTimeout("g"), TimeoutError)


def test_a_key_conflict_carries_the_original() -> None:
    """PROTOCOL.md "Idempotent publish": a 409 names the original's s and epoch;
    the host's KeyConflict is the table's."""
    from guildcast.core import host

    exc = KeyConflict(7, "e1")
    assert exc.fields() == {"s": 7, "epoch": "e1"}
    assert Overloaded("busy").fields() == {}
    assert host.KeyConflict is KeyConflict
