"""A node whose start fails part way undoes everything it started: its
listeners are closed and no task of it is left running (every task of the
node is in its one task group, broker tasks included)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from guildcast import Config, Server
from tests.support.node import SECRET


async def test_a_failed_start_unwinds_the_gateway_the_broker_and_every_task(
    tmp_path: Path,
) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        before = asyncio.all_tasks()
        srv = Server(
            Config(
                host="127.0.0.1",
                port=0,
                api_port=busy.getsockname()[1],  # the HTTP API cannot listen
                secret=SECRET,
                data_dir=str(tmp_path / "data"),
            )
        )
        with pytest.raises(OSError):
            await srv.start()
        assert srv.port > 0  # the gateway had started...
        with pytest.raises(ConnectionRefusedError):  # ...and is closed again
            _, w = await asyncio.open_connection("127.0.0.1", srv.port)
            w.close()
        assert asyncio.all_tasks() == before  # the journal syncer and sweeper too
        # Nothing half-started remains: the same config starts cleanly now.
        busy.close()
        async with Server(srv.config) as again:
            assert again.port > 0
    finally:
        busy.close()
