"""What the broker contract suite (tests/broker/test_contract.py) needs of an
implementation beyond the ``Broker`` protocol: a way to make one, and the
faults its storage and its feed can have.

A third-party broker runs the suite by writing one class that follows
:class:`BrokerHarness` (the three below are examples) and naming it::

    GUILDCAST_BROKER_HARNESS=mypackage.harness:MyHarness \\
        python -m pytest tests/broker/test_contract.py

(``module:Class``; several separated by commas). The class is built with
one argument, a fresh directory (``pathlib.Path``) it may use; the suite
then runs every contract test against it as well as against the built-in
brokers. A fault an implementation cannot have (an in-process feed has no
gap) is answered ``False`` and the test that needs it is skipped for it,
saying why.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis

from guildcast.broker.base import Broker
from guildcast.broker.disk import GUILDS_DIR, DiskBroker
from guildcast.broker.memory import MemoryBroker
from guildcast.broker.redis import RedisBroker, guild_keys
from guildcast.core import journal
from tests.support.redis import RedisProc

#: The environment variable naming third-party harnesses (``module:Class``, comma-separated).
HARNESS_ENV = "GUILDCAST_BROKER_HARNESS"


class BrokerHarness(Protocol):
    """Makes brokers of one implementation and injects its faults."""

    #: The name the suite's test ids carry.
    name: str

    def __init__(self, workdir: Path) -> None:
        """``workdir``: a fresh directory the harness may use."""

    async def make(self, history_size: int, history_ttl: float) -> Broker:
        """A started broker keeping at most ``history_size`` events per guild
        for at most ``history_ttl`` seconds; the harness closes it in :meth:`close`."""

    async def lose(self, broker: Broker, gid: str) -> Broker:
        """Lose ``gid``'s stored log as this implementation's storage can
        lose it (a restart without it, a deleted file, a flushed key) and
        return the broker to go on with (``broker`` itself, or a started
        successor after closing it)."""

    async def interrupt_feed(self, broker: Broker) -> bool:
        """Cut the live feed once (the broker is expected to recover by
        itself); False if this implementation's feed cannot have a gap."""

    async def break_storage(self, broker: Broker) -> bool:
        """Make appends fail from now on (what "unavailable" means here);
        False if the implementation cannot be unavailable."""

    async def repair_storage(self, broker: Broker) -> None:
        """Undo :meth:`break_storage`; the broker recovers by itself."""

    async def close(self) -> None:
        """Close every broker made and stop whatever the harness started."""


class _Brokers:
    """Closes the brokers a harness made."""

    def __init__(self) -> None:
        self.made: list[Broker] = []

    def keep(self, b: Broker) -> Broker:
        self.made.append(b)
        return b

    async def close_all(self) -> None:
        for b in self.made:
            await b.close()
        self.made.clear()


class MemoryHarness(_Brokers):
    """One node, in process: its storage is the process, lost by a restart."""

    name = "memory"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.args: tuple[int, float] = (50, 300.0)

    async def make(self, history_size: int, history_ttl: float) -> Broker:
        self.args = (history_size, history_ttl)
        b = MemoryBroker(history_size, history_ttl)
        await b.start()
        return self.keep(b)

    async def lose(self, broker: Broker, gid: str) -> Broker:
        await broker.close()  # a restarted process has lost every guild
        return await self.make(*self.args)

    async def interrupt_feed(self, broker: Broker) -> bool:
        return False  # records go to the listener in the appending call

    async def break_storage(self, broker: Broker) -> bool:
        return False  # memory is always there

    async def repair_storage(self, broker: Broker) -> None:
        raise AssertionError("nothing to repair")

    async def close(self) -> None:
        await self.close_all()


class DiskHarness(_Brokers):
    """A journal per guild under a data dir: a lost journal file is a lost log;
    a data dir that refuses writes is an unavailable broker."""

    name = "disk"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.root = workdir / "data"
        self.args: tuple[int, float] = (50, 300.0)

    async def make(self, history_size: int, history_ttl: float) -> Broker:
        self.args = (history_size, history_ttl)
        b = DiskBroker(self.root, history_size, history_ttl, fsync="always")
        await b.start()
        return self.keep(b)

    async def lose(self, broker: Broker, gid: str) -> Broker:
        await broker.close()
        journal.journal_path(self.root / GUILDS_DIR, gid).unlink()
        return await self.make(*self.args)

    async def interrupt_feed(self, broker: Broker) -> bool:
        return False  # records go to the listener in the appending call

    async def break_storage(self, broker: Broker) -> bool:
        # A file where the journals' directory was: no new journal can be
        # written (an open one would still take appends, as on a full disk).
        guilds = self.root / GUILDS_DIR
        guilds.rename(self.root / "guilds.away")
        guilds.write_bytes(b"")
        return True

    async def repair_storage(self, broker: Broker) -> None:
        guilds = self.root / GUILDS_DIR
        guilds.unlink()
        (self.root / "guilds.away").rename(guilds)

    async def close(self) -> None:
        await self.close_all()


class RedisHarness(_Brokers):
    """A real redis-server: flushed keys are a lost log, a killed pub/sub
    connection is a feed gap, a stopped server is an unavailable broker."""

    name = "redis"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.proc = RedisProc(workdir)
        self.proc.start()
        self.client = aioredis.Redis(port=self.proc.port)

    async def make(self, history_size: int, history_ttl: float) -> Broker:
        b = RedisBroker(self.proc.url, history_size, history_ttl, health_interval=0.1)
        await b.start()
        return self.keep(b)

    async def lose(self, broker: Broker, gid: str) -> Broker:
        await self.client.delete(*guild_keys(gid)[:3])
        return broker

    async def interrupt_feed(self, broker: Broker) -> bool:
        killed = await self.client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(killed) >= 1, "no pub/sub connection to cut"
        return True

    async def break_storage(self, broker: Broker) -> bool:
        await self.client.aclose()
        self.proc.stop()
        return True

    async def repair_storage(self, broker: Broker) -> None:
        self.proc.start()  # same port, no data: a Redis restarted without persistence
        self.client = aioredis.Redis(port=self.proc.port)

    async def close(self) -> None:
        try:
            await self.close_all()
            await self.client.aclose()
        finally:
            self.proc.stop()


#: The built-in implementations, by name.
BUILTIN: dict[str, type[BrokerHarness]] = {
    "memory": MemoryHarness,
    "disk": DiskHarness,
    "redis": RedisHarness,
}


def third_party() -> dict[str, str]:
    """``{test id: "module:Class"}`` of the harnesses named in :data:`HARNESS_ENV`."""
    spec = os.environ.get(HARNESS_ENV, "")
    return {s.strip(): s.strip() for s in spec.split(",") if s.strip()}


def load(spec: str) -> type[BrokerHarness]:
    """The harness class named ``module:Class``."""
    module, _, cls = spec.partition(":")
    if not module or not cls:
        raise ValueError(f"{HARNESS_ENV} entries are module:Class, not {spec!r}")
    harness: type[BrokerHarness] = getattr(importlib.import_module(module), cls)
    return harness
