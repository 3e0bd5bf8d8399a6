"""``d`` reaches subscribers exactly as the publisher wrote it (docs/PROTOCOL.md,
"Messages"): an integer beyond 64 bits stays an integer, digit for digit, on
the gateway, the HTTP API and the embedded API (it used to become a float)."""

from __future__ import annotations

import asyncio

from tests.support import gateway as gw
from tests.support.api import Api
from tests.support.node import node

BIG = 123456789012345678901234567890
#: A number of each kind orjson keeps alone, next to the big one.
DOC = f'{{"n":{BIG},"neg":-{BIG},"u64":18446744073709551615,"f":1.5,"s":"{BIG}"}}'


def dispatch(s: int, d: str) -> str:
    return f'{{"op":0,"t":"BIG","g":"big","s":{s},"d":{d}}}'


async def next_dispatch(ws: gw.ClientConnection) -> str:
    async with asyncio.timeout(gw.TIMEOUT):
        while True:
            raw = await ws.recv()
            assert isinstance(raw, str)
            if raw.startswith('{"op":0,"t":"BIG"'):
                return raw


async def test_integers_beyond_64_bits_arrive_exactly_on_every_transport() -> None:
    async with node(api=True) as srv:
        token = srv.token("reader", guilds=["big"])
        ws, sub = await gw.subscribe(srv.url, token, "big")
        assert sub["s"] == 0
        # The gateway: PUBLISH written by hand (orjson cannot write BIG).
        pub = await gw.open_ws(srv.url)
        await gw.identify(pub, srv.token("w", guilds=["big"], pub=["big"]))
        await pub.send(f'{{"op":5,"d":{{"guild":"big","t":"BIG","d":{DOC},"nonce":"a"}}}}')
        ack = await gw.recv(pub)
        assert ack["op"] == gw.ACK and ack["d"]["s"] == 1, ack
        assert await next_dispatch(ws) == dispatch(1, DOC)
        # The HTTP API.
        async with Api(srv.api_url) as api:
            body = f'{{"guild":"big","t":"BIG","d":{DOC}}}'.encode()
            status, answer, _ = await api.request(
                "POST", "/v1/publish", data=body, headers={"Content-Type": "application/json"}
            )
            assert status == 200, answer
        assert await next_dispatch(ws) == dispatch(2, DOC)
        # The embedded API.
        assert await srv.publish("big", "BIG", {"n": 2**70}) == 3
        assert await next_dispatch(ws) == dispatch(3, f'{{"n":{2**70}}}')
        await ws.close()
        await pub.close()
