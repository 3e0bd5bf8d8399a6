"""The greedy acceptor (server/transport/acceptor.py): connections waiting in
a listening socket's queue are taken up to ACCEPT_BATCH per readiness, not
one per loop turn as libuv's own server takes them, so a node whose turns
are long still takes a storm's arrivals in a few turns; a closed acceptor
accepts nothing more and frees its port."""

from __future__ import annotations

import asyncio
import socket

from guildcast.transport.acceptor import ACCEPT_BATCH, Acceptor

#: Connections queued before the loop runs: more than two batches.
QUEUED = 2 * ACCEPT_BATCH + 44
#: Loop turns allowed to take them all: one connection per turn (libuv's
#: server) would take QUEUED turns.
TURNS = 12


class Sink(asyncio.Protocol):
    made: list[asyncio.Transport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Sink.made.append(transport)  # type: ignore[arg-type]


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def _queue(port: int, n: int) -> list[socket.socket]:
    """``n`` connections the kernel completes before anything accepts them."""
    out = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        out.append(c)
    return out


def _close(acc: Acceptor, clients: list[socket.socket]) -> None:
    acc.close()
    for t in Sink.made:
        t.close()
    for c in clients:
        c.close()


async def test_queued_connections_are_taken_in_a_few_turns() -> None:
    Sink.made = []
    sock = _listener()
    port = sock.getsockname()[1]
    clients = _queue(port, QUEUED)  # the loop is not running meanwhile
    acc = Acceptor(sock, Sink)
    try:
        turns = 0
        while len(Sink.made) < QUEUED and turns < TURNS:
            await asyncio.sleep(0)
            turns += 1
        assert acc.accepted == QUEUED, (acc.accepted, turns)
        # every one handed to the loop as a connection of its own
        await acc.wait_closed()
        assert len(Sink.made) == QUEUED
        assert len({t.get_extra_info("peername") for t in Sink.made}) == QUEUED
        # and each accepted one is a working connection
        Sink.made[0].write(b"hello")
        clients_by_port = {c.getsockname(): c for c in clients}
        peer = Sink.made[0].get_extra_info("peername")
        got = await asyncio.to_thread(clients_by_port[peer].recv, 5)
        assert got == b"hello"
    finally:
        _close(acc, clients)


async def test_a_closed_acceptor_accepts_nothing_and_frees_its_port() -> None:
    Sink.made = []
    sock = _listener()
    port = sock.getsockname()[1]
    acc = Acceptor(sock, Sink)
    acc.close()
    acc.close()  # idempotent
    assert sock.fileno() == -1
    try:
        refused = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionRefusedError:
        pass
    else:  # pragma: no cover - the port must be free
        refused.close()
        raise AssertionError("a closed acceptor's port still accepts")
    again = socket.socket()
    again.bind(("127.0.0.1", port))
    again.close()
    await asyncio.sleep(0)
    assert Sink.made == [] and acc.accepted == 0


async def test_connections_accepted_as_it_closes_are_ended_not_opened() -> None:
    """Accepted, not yet handed to the loop, when the acceptor closes (a
    drain's stop_accepting): ended (the client sees the connection close and
    retries), never opened after the drain has listed what it must drain."""
    Sink.made = []
    sock = _listener()
    port = sock.getsockname()[1]
    clients = _queue(port, 10)
    acc = Acceptor(sock, Sink)
    try:
        turns = 0
        while acc.accepted < 10 and turns < TURNS:
            await asyncio.sleep(0)
            turns += 1
        assert acc.accepted == 10 and Sink.made == [], (acc.accepted, len(Sink.made))
        acc.close()
        await acc.wait_closed()
        assert Sink.made == []
        for c in clients:
            assert await asyncio.to_thread(c.recv, 5) == b""  # ended, not served
    finally:
        _close(acc, clients)
