"""The delivery cursor (``guildcast.actors.cursor``), without an event loop:
examples, then random feeds (duplicates, gaps, missed-notices, an epoch
change) against a model of what must be delivered."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from guildcast.actors.cursor import Cursor, Lost, ReadBack, Step
from guildcast.broker.base import Record

E, E2 = "e1", "e2"


def rec(s: int, epoch: str = "") -> Record:
    return Record(s, "EV", 0.0, b"{}", epoch)


@dataclass
class History:
    """The broker's side: events 1..head of ``epoch``, ``first`` the oldest kept."""

    epoch: str
    head: int
    first: int

    def read(self, after: int, limit: int) -> tuple[str, list[Record]]:
        lo = max(after + 1, self.first)
        return self.epoch, [rec(s) for s in range(lo, min(self.head, lo + limit - 1) + 1)]


def drive(cur: Cursor, step: Step, history: History) -> tuple[list[int], Lost | None]:
    """What the guild does with a step: deliver, read back, or give up."""
    delivered: list[int] = []
    out, nxt = step
    while True:
        delivered += [r.s for r in out]
        if nxt is None or type(nxt) is Lost:
            return delivered, nxt
        assert type(nxt) is ReadBack and nxt.after == cur.s
        out, nxt = cur.page(*history.read(nxt.after, nxt.limit))


def test_in_order_records_are_delivered_once() -> None:
    cur = Cursor(E, 0)
    assert drive(cur, cur.feed([rec(1), rec(2), rec(2), rec(1), rec(3)]), History(E, 3, 1)) == (
        [1, 2, 3],
        None,
    )
    assert cur.s == 3


def test_a_gap_is_read_back_from_history_before_what_follows_it() -> None:
    cur = Cursor(E, 2, page_size=2)
    step = cur.feed([rec(7), rec(8)])
    assert step == ([], ReadBack(2, 2))
    assert drive(cur, step, History(E, 8, 1)) == ([3, 4, 5, 6, 7, 8], None)


def test_a_gap_history_no_longer_has_is_history_lost() -> None:
    cur = Cursor(E, 2)
    delivered, lost = drive(cur, cur.feed([rec(9)]), History(E, 9, 5))
    assert delivered == [] and lost == Lost("events missing from history")


def test_a_record_of_another_epoch_is_never_delivered() -> None:
    cur = Cursor(E, 0)
    out, nxt = cur.feed([rec(1, E), rec(2, E2)])
    assert [r.s for r in out] == [1] and nxt == Lost(f"feed record of epoch {E2}")


def test_a_read_back_under_another_epoch_is_history_lost() -> None:
    cur = Cursor(E, 0)
    assert drive(cur, cur.missed(), History(E2, 4, 1)) == ([], Lost(f"epoch changed to {E2}"))


def test_missed_reads_to_the_end_over_several_pages() -> None:
    cur = Cursor(E, 1, page_size=3)
    assert drive(cur, cur.missed(), History(E, 10, 1)) == (list(range(2, 11)), None)
    assert not cur.reading


# --- random feeds against a model -------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), st.lists(st.integers(1, 40), max_size=6)),
        st.tuples(st.just("missed"), st.just([])),
        st.tuples(st.just("foreign"), st.lists(st.integers(1, 40), min_size=1, max_size=2)),
    ),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(
    start=st.integers(0, 10),
    head=st.integers(10, 40),
    first=st.integers(1, 25),
    page=st.integers(1, 5),
    feeds=ops,
    epoch_change_at=st.integers(0, 14),
)
def test_random_feeds_deliver_what_the_model_says(
    start: int,
    head: int,
    first: int,
    page: int,
    feeds: list[tuple[str, list[int]]],
    epoch_change_at: int,
) -> None:
    """Feeds in any order, with repeats and holes, "you may have missed some"
    notices and, from some point on, a new epoch (the broker lost its data):
    the cursor delivers exactly ``start+1 .. s``, each once and in order, and
    says "history lost" exactly when the model says it must."""
    history = History(E, head, min(first, head))
    cur = Cursor(E, start, page_size=page)
    model_s, model_lost = start, False
    delivered: list[int] = []
    lost: Lost | None = None
    for i, (kind, ss) in enumerate(feeds):
        if i == epoch_change_at:
            history.epoch = E2  # every read from here on answers the new epoch
        if kind == "missed":
            step = cur.missed()
        else:
            epoch = E2 if kind == "foreign" else ""
            step = cur.feed([rec(min(s, head), epoch) for s in sorted(ss)])
        # The model, record by record.
        if kind == "missed":
            if history.epoch != E or (model_s + 1 < history.first and model_s < head):
                model_lost = True
            else:
                model_s = head
        else:
            for s in sorted(min(s, head) for s in ss):
                if kind == "foreign":
                    model_lost = True
                    break
                if s <= model_s:
                    continue
                if s > model_s + 1 and (history.epoch != E or model_s + 1 < history.first):
                    model_lost = True
                    break
                model_s = s
        got, lost = drive(cur, step, history)
        delivered += got
        assert not cur.reading
        if model_lost or lost is not None:
            break
    assert (lost is not None) == model_lost, (lost, model_s, delivered)
    if not model_lost:
        assert delivered == list(range(start + 1, model_s + 1))
    else:  # a prefix of the same sequence, each once
        assert delivered == list(range(start + 1, start + 1 + len(delivered)))
