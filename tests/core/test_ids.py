"""core/ids.py: buffered random ids are well formed and never repeat."""

from __future__ import annotations

import pytest

from guildcast.core.ids import BATCH, HexIds


@pytest.mark.parametrize("nbytes", [8, 7, 16])
def test_ids_are_hex_of_the_size_and_distinct_across_refills(nbytes: int) -> None:
    ids = HexIds(nbytes)
    got = [ids.next() for _ in range(3 * BATCH // nbytes + 5)]
    assert all(len(i) == 2 * nbytes and int(i, 16) >= 0 for i in got)
    assert len(set(got)) == len(got)


def test_size_is_bounded() -> None:
    with pytest.raises(ValueError):
        HexIds(0)
    with pytest.raises(ValueError):
        HexIds(BATCH + 1)
