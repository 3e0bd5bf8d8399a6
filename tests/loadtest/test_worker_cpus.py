"""Subscriber workers on more cores: one per ``--client-cpus`` CPU unless
``--workers`` says otherwise, each pinned to its own CPU."""

from __future__ import annotations

from guildcast.loadtest.scenarios import default_workers, worker_cpus


def test_one_worker_per_client_cpu_unless_given() -> None:
    assert default_workers(None, 1, None) == 1
    assert default_workers(None, 1, [1]) == 1
    assert default_workers(None, 1, [1, 2, 3]) == 3
    assert default_workers(None, 4, [1, 2]) == 4  # the storm's four stay four
    assert default_workers(1, 1, [1, 2, 3]) == 1  # given: as given
    assert default_workers(2, 4, None) == 2


def test_each_worker_pinned_to_its_own_cpu() -> None:
    assert [worker_cpus([2, 3], w, 2) for w in range(2)] == [[2], [3]]
    assert [worker_cpus([2, 3], w, 4) for w in range(4)] == [[2], [3], [2], [3]]
    # Fewer workers than CPUs, one CPU, or none: the whole set, as before.
    assert worker_cpus([1, 2, 3], 0, 2) == [1, 2, 3]
    assert worker_cpus([1], 0, 3) == [1]
    assert worker_cpus(None, 0, 2) is None
