"""300 clients over 3 guilds, 2,000 events from concurrent publishers: every
client gets every event of its guilds, in order, gap-free, no duplicates
(PROTOCOL.md "Subscribing and recovery", the guarantee)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from tests.support import gateway as gw
from tests.support.node import node

GUILDS = ["fan-0", "fan-1", "fan-2"]
CLIENTS = 300
#: Embedded publishers x events each, gateway publishers x events each: 2,000.
EMBEDDED, EMBEDDED_EACH = 4, 300
GATEWAY, GATEWAY_EACH = 2, 400


def guilds_of(i: int) -> list[str]:
    """Client i reads guild i % 3; every tenth also reads the next one."""
    own = [GUILDS[i % 3]]
    if i % 10 == 0:
        own.append(GUILDS[(i + 1) % 3])
    return own


async def test_300_clients_3_guilds_2000_events() -> None:
    async with node(partition_size=16) as srv, asyncio.timeout(120):
        token = srv.token("reader", guilds=["fan-*"])
        conns = await asyncio.gather(
            *(gw.session(srv.url, token, dict.fromkeys(guilds_of(i))) for i in range(CLIENTS))
        )
        for _ws, subs in conns:
            assert all(d["s"] == 0 and d["recovered"] is False for d in subs.values())
        epochs = {g: {subs[g]["epoch"] for _ws, subs in conns if g in subs} for g in GUILDS}
        assert all(len(e) == 1 for e in epochs.values()), epochs

        # expected[g][s] = d, filled from srv.publish results and ACKs.
        expected: dict[str, dict[int, Any]] = {g: {} for g in GUILDS}
        ends: dict[str, int] = {}

        async def receive(ws: Any, mine: list[str]) -> dict[str, list[tuple[int, Any]]]:
            got: dict[str, list[tuple[int, Any]]] = {g: [] for g in mine}
            done: set[str] = set()
            while len(done) < len(mine):
                # No per-message timeout here (it costs); the test has one.
                m = orjson.loads(await ws.recv())
                assert m["op"] == gw.DISPATCH and m["g"] in got, m
                if m["t"] == "END":
                    done.add(m["g"])
                else:
                    assert m["g"] not in done, "event after END"
                    got[m["g"]].append((m["s"], m["d"]))
            return got

        receivers = [
            asyncio.create_task(receive(ws, guilds_of(i))) for i, (ws, _s) in enumerate(conns)
        ]

        async def embedded(p: int) -> None:
            for j in range(EMBEDDED_EACH):
                g = GUILDS[(j + p) % 3]
                d = {"p": f"e{p}", "j": j}
                s = await srv.publish(g, "EV", d)
                expected[g][s] = d

        async def gateway(p: int) -> None:
            tok = srv.token(f"pub{p}", guilds=[], pub=["fan-*"], pub_rate=0)
            ws, _ = await gw.session(srv.url, tok)
            sent: list[tuple[str, Any]] = []

            async def send_all() -> None:
                for j in range(GATEWAY_EACH):
                    g = GUILDS[(j + p) % 3]
                    d = {"p": f"g{p}", "j": j}
                    sent.append((g, d))
                    await gw.send(
                        ws, gw.PUBLISH, {"guild": g, "t": "EV", "d": d, "nonce": f"{p}:{j}"}
                    )
                    if j % 50 == 0:
                        await asyncio.sleep(0)  # interleave with the other publishers

            sender = asyncio.create_task(send_all())
            for j in range(GATEWAY_EACH):
                ack = await gw.recv(ws)
                assert ack["op"] == gw.ACK, ack
                # ACKs come back in the order the PUBLISHes were sent.
                assert ack["d"]["nonce"] == f"{p}:{j}"
                g, d = sent[j]
                assert ack["d"]["g"] == g and ack["d"]["epoch"] in epochs[g]
                expected[g][ack["d"]["s"]] = d
            await sender
            await ws.close()

        t0 = time.monotonic()
        await asyncio.gather(
            *(embedded(p) for p in range(EMBEDDED)), *(gateway(p) for p in range(GATEWAY))
        )
        for g in GUILDS:
            ends[g] = await srv.publish(g, "END", None)
        results = await asyncio.gather(*receivers)
        elapsed = time.monotonic() - t0

        total = sum(len(v) for v in expected.values())
        assert total == EMBEDDED * EMBEDDED_EACH + GATEWAY * GATEWAY_EACH == 2000
        for g in GUILDS:
            # s values are exactly 1..n per guild, END right after them.
            assert sorted(expected[g]) == list(range(1, len(expected[g]) + 1))
            assert ends[g] == len(expected[g]) + 1
        deliveries = 0
        for i, got in enumerate(results):
            for g in guilds_of(i):
                want = [(s, expected[g][s]) for s in range(1, ends[g])]
                assert got[g] == want, f"client {i} guild {g}"
                deliveries += len(got[g])
        print(f"\n{deliveries} deliveries to {CLIENTS} clients in {elapsed:.2f} s")
        for ws, _s in conns:
            await ws.close()
