"""An IDENTIFY is decoded once (server/transport/gateway.py): admission
looks inside it to tell a resume from a fresh session, and the session is
given what admission decoded, whether the IDENTIFY was served at once or
waited its turn in the queue (server/transport/admission.py)."""

from __future__ import annotations

from typing import Any

import pytest

from guildcast.protocol import wire
from tests.support.gateway import session
from tests.support.node import node


@pytest.mark.parametrize("admit_rate", [1000.0, 2.0])
async def test_an_identify_is_decoded_once(
    monkeypatch: pytest.MonkeyPatch, admit_rate: float
) -> None:
    decoded: list[bytes] = []
    real = wire.decode

    def counting(data: Any) -> Any:
        decoded.append(bytes(data) if not isinstance(data, str) else data.encode())
        return real(data)

    # At 2/s the burst is 2 and a fresh session leaves half of it: the
    # second session's IDENTIFY waits in the queue for its token.
    async with node(admit_rate=admit_rate) as srv:
        tok = srv.token("u", guilds=["*"])
        monkeypatch.setattr(wire, "decode", counting)
        socks = []
        for _ in range(2):
            ws, subs = await session(srv.url, tok, {"g": None})
            assert set(subs) == {"g"}
            socks.append(ws)
        if admit_rate < 10:
            assert srv.gateway.admission.stats.queued_fresh >= 1
        identifies = [d for d in decoded if b'"op":2' in d]
        assert len(identifies) == 2, identifies  # one decode each
        for ws in socks:
            await ws.close()
