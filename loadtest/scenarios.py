"""Scenario names, their defaults, and the plan a run is built from.

Owns the defaults documented in ``loadtest/README.md`` (keep both in step)
and the assignment of clients to guilds, roles and workers. Pure data: no
I/O. A :class:`Plan` is fully resolved (no None left but the target fields),
so a run's JSON records exactly what ran.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from guildcast.loadtest.fleet import ClientSpec

#: Scenario defaults; any option given on the command line wins.
DEFAULTS: dict[str, dict[str, Any]] = {
    # One guild, everyone in it, publish as fast as ACKs allow.
    "bigguild": {"clients": 5000, "guilds": 1, "rate": 0.0, "inflight": 8},
    # One guild at a fixed rate: latency percentiles.
    "latency": {"clients": 5000, "guilds": 1, "rate": 20.0},
    # 10,000 clients in 1,000 guilds of 10, random guild per publish, max rate.
    "manyguilds": {"clients": 10_000, "guilds": 1000, "rate": 0.0, "inflight": 64},
    # Idle subscribed connections: connect rate and RSS per connection. One
    # server process can hold at most the open-files hard limit (20,000 here).
    "connect": {"clients": 19_000, "guilds": 100, "duration": 10.0},
    # Half the clients come and go (reconnect fresh, reconnect with Position,
    # or unsubscribe + resubscribe) every 0.5-2 s while events flow.
    "churn": {"clients": 2000, "guilds": 10, "rate": 200.0, "churn_fraction": 0.5},
    # Every session dropped mid-stream; every client recovers with its Position.
    "reconnect": {"clients": 2000, "guilds": 20, "rate": 200.0},
    # A reconnect storm (docs/OPERATIONS.md "Deploying without a reconnect
    # storm"): 19,000 clients over 1,000 guilds at 2,000 events/s; at
    # --reconnect-at the server is restarted (restart: SIGTERM then start
    # again, --data-dir; kill: kill -9), or with --reconnect-mode rolling /
    # kill-worker a --workers 2 cluster on Redis has each worker restarted
    # in turn, or one killed. 19,000 clients need several harness processes
    # (20,000 open files each).
    "storm": {
        "clients": 19_000,
        "guilds": 1000,
        "rate": 2000.0,
        "duration": 60.0,
        "reconnect_at": 0.3,
        "reconnect_mode": "restart",
        "workers": 4,
        "lat_sample": 0.25,
        "connect_timeout": 180.0,
        "drain_timeout": 120.0,
        # Every client on its own, as real ones are: a storm is all of them
        # at once, and the harness must not queue them (a pool of 256 opens
        # would pace the storm by the server's latency under load).
        "connect_concurrency": 19_000,
    },
    # 10% of clients stop reading; the server closes them (4010) and the rest
    # keep their latency; the server's memory stays bounded.
    # At 200 x 4 KiB/s a stopped client passes 1 MiB of server buffer plus
    # about 3.5 MB of kernel buffers in about 6 s, inside a 15 s run; 500
    # clients keep the others' 90k deliveries/s within one harness core.
    "slowconsumers": {
        "clients": 500,
        "guilds": 1,
        "rate": 200.0,
        "size": 4096,
        "slow_fraction": 0.1,
        "max_buffer": 1024 * 1024,
    },
    # Discord's lazy guilds: each client in 20 of 1,000 guilds, looking at
    # one (active) and passive in 19; events spread over every guild at a
    # fixed rate. ``--active 20`` is the same sessions all active.
    "passive": {
        "clients": 10_000,
        "guilds": 1000,
        "per_client": 20,
        "active": 1,
        "rate": 500.0,
        "duration": 10.0,
    },
}

#: Defaults shared by every scenario.
COMMON: dict[str, Any] = {
    "duration": 15.0,
    "rate": 0.0,
    "size": 200,
    "publishers": 1,
    "workers": 1,
    "via": "gateway",
    "slow_fraction": 0.0,
    "churn_fraction": 0.0,
    "churn_life": (0.5, 2.0),
    "reconnect_at": 0.5,
    "reconnect_mode": "auto",
    "lat_sample": 1.0,
    #: Flow control for rate 0 (see loadtest/publish.py): None picks
    #: ``default_max_lag`` at rate 0 (events in flight = published and not
    #: yet received by the average subscriber) and off (0) at a fixed rate.
    "max_lag": None,
    "max_buffer": None,
    "history_size": None,
    "source_addrs": 16,
    "connect_concurrency": 256,
    "connect_timeout": 120.0,
    "drain_timeout": 20.0,
    "seed": 1,
    #: Small receive buffer for slow consumers, so they stop the server's
    #: writes soon (a phone on a bad link has a small window too).
    "slow_rcvbuf": 16384,
    #: Subscribers offer permessage-deflate and inflate what comes compressed
    #: (``--deflate``); the server compresses if its ``--compression`` is on.
    "deflate": False,
    #: What pads each event's ``d``: "x" (one repeated letter, which deflate
    #: squeezes to nothing) or "text" (prose-like words, which compress as
    #: chat messages do): ``--pad``.
    "pad": "x",
    #: Guilds per client (client i is in guilds i, i + G/n, i + 2G/n, ...
    #: modulo G) and how many of them, the first ones, are active (None:
    #: all); the others are subscribed passively.
    "per_client": 1,
    "active": None,
    #: Seconds between a fixed-rate publisher's writes (0: each event as it
    #: falls due, so the server wakes once per event): ``--publish-tick``.
    "publish_tick": 0.0,
    #: Clients ask for batched passive notices (IDENTIFY ``activity_batch``):
    #: ``--activity-batch``.
    "activity_batch": False,
}

SCENARIOS = tuple(DEFAULTS)
#: Scenarios that drop every session and check that every client recovers.
RECOVERY = ("reconnect", "storm")
#: Workers of the cluster a storm's rolling / kill-worker modes start.
CLUSTER_WORKERS = 2

#: ``--pad`` kinds (``guildcast.loadtest.wire.pad_for``).
PADS = ("x", "text")

#: Longest run the harness accepts (runs are bounded in time).
MAX_DURATION = 3600.0
#: Most clients per run (bounded in count).
MAX_CLIENTS = 1_000_000
#: Longest ``--publish-tick``: a publisher holding events longer than this
#: would be measuring its own batching, not the server.
MAX_PUBLISH_TICK = 0.1


@dataclass
class Plan:
    scenario: str
    clients: int
    guilds: int
    duration: float
    rate: float
    inflight: int
    size: int
    publishers: int
    workers: int
    via: str
    slow_fraction: float
    churn_fraction: float
    churn_life: tuple[float, float]
    reconnect_at: float
    reconnect_mode: str
    lat_sample: float
    max_lag: int
    max_buffer: int | None
    history_size: int | None
    source_addrs: int
    connect_concurrency: int
    connect_timeout: float
    drain_timeout: float
    seed: int
    slow_rcvbuf: int
    deflate: bool = False
    pad: str = "x"
    server_opts: dict[str, Any] = field(default_factory=dict)
    per_client: int = 1
    active: int | None = None
    publish_tick: float = 0.0
    activity_batch: bool = False

    @property
    def active_per_client(self) -> int:
        """Guilds each client subscribes actively."""
        return self.per_client if self.active is None else self.active

    @property
    def cluster(self) -> bool:
        """A storm on ``--workers N`` over Redis (rolling, kill-worker)."""
        return self.scenario == "storm" and self.reconnect_mode in ("rolling", "kill-worker")

    @property
    def publishes(self) -> bool:
        """False for ``connect``: it only publishes one probe event per guild."""
        return self.scenario != "connect"

    def gids(self) -> list[str]:
        return [f"lt-{k}" for k in range(self.guilds)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: Bytes of events a subscriber may be behind by before the flow-control
#: gate closes (rate 0): Linux's default TCP send buffer (``tcp_wmem``'s
#: middle value), so a lagging subscriber's backlog sits in socket buffers
#: and the server writes to it as to one that keeps up; far below the
#: server's unsent-bytes bound (4 MiB).
GATE_BYTES = 16 * 1024
#: Bytes of a DISPATCH frame beyond its ``d`` (header, envelope, a long ``s``).
FRAME_OVERHEAD = 64


def default_max_lag(window: int, size: int, guilds: int = 1, active: int = 1) -> int:
    """The gate at rate 0, in events published and not yet received by the
    average subscriber: the publishers' ACK window (what the referee's
    publisher is held by, loadtest/publish.py), or as many events as leave
    each subscriber :data:`GATE_BYTES` behind, whichever is more. A
    subscriber active in ``active`` of ``guilds`` guilds gets that share of
    the events, so its backlog is that share of what is in flight. A gate of
    the window alone throttled the publisher to the fleet's pace, so the
    server was offered fewer events per loop turn than the referee offers it
    (docs/BENCHMARKS.md)."""
    per_subscriber = GATE_BYTES // (size + FRAME_OVERHEAD)
    return max(window, per_subscriber * max(1, guilds) // max(1, active))


def make_plan(scenario: str, given: dict[str, Any]) -> Plan:
    """Resolve ``given`` (None = not given) over the scenario's defaults."""
    if scenario not in DEFAULTS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    values: dict[str, Any] = {**COMMON, **DEFAULTS[scenario]}
    for k, v in given.items():
        if v is not None:
            values[k] = v
    if values.get("inflight") is None:
        # Rate 0 keeps a small window (latency stays honest); a fixed rate
        # gets a large one so pacing, not the window, sets the rate. Over
        # HTTP the window is a number of connections: keep it small.
        if values["via"] == "http":
            values["inflight"] = 8 if values["rate"] <= 0 else 32
        else:
            values["inflight"] = 8 if values["rate"] <= 0 else 1024
    if values.get("max_lag") is None:
        values["max_lag"] = (
            default_max_lag(
                values["inflight"] * values["publishers"],
                values["size"],
                values["guilds"],
                values["per_client"] if values.get("active") is None else values["active"],
            )
            if values["rate"] <= 0
            else 0
        )
    values["scenario"] = scenario
    plan = Plan(**{k: values[k] for k in Plan.__dataclass_fields__ if k in values})
    _validate(plan)
    return plan


def _validate(p: Plan) -> None:
    if not 1 <= p.clients <= MAX_CLIENTS:
        raise ValueError(f"--clients must be 1..{MAX_CLIENTS}")
    if not 1 <= p.guilds <= p.clients:
        raise ValueError("--guilds must be 1..clients")
    if not 0 < p.duration <= MAX_DURATION:
        raise ValueError(f"--duration must be in (0, {MAX_DURATION:.0f}] seconds")
    if p.rate < 0 or p.inflight < 1 or p.size < 0 or p.publishers < 1 or p.workers < 1:
        raise ValueError(
            "--rate >= 0, --inflight >= 1, --size >= 0, --publishers >= 1, --workers >= 1"
        )
    if not 0 <= p.slow_fraction < 1 or not 0 <= p.churn_fraction < 1:
        raise ValueError("--slow-fraction and --churn-fraction must be in [0, 1)")
    if p.slow_fraction + p.churn_fraction >= 1:
        raise ValueError("some clients must neither churn nor be slow")
    if p.pad not in PADS:
        raise ValueError(f"--pad must be one of {', '.join(PADS)}")
    if not 0 < p.reconnect_at < 1:
        raise ValueError("--reconnect-at is a fraction of the duration, in (0, 1)")
    if p.max_lag < 0:
        raise ValueError("--max-lag must be >= 0 (0: no flow control)")
    if not 0 <= p.publish_tick <= MAX_PUBLISH_TICK:
        raise ValueError(f"--publish-tick must be in [0, {MAX_PUBLISH_TICK}] seconds")
    if not 0 < p.lat_sample <= 1:
        raise ValueError("--lat-sample must be in (0, 1]")
    if not 1 <= p.source_addrs <= 254:
        raise ValueError("--source-addrs must be 1..254")
    if p.via not in ("gateway", "http"):
        raise ValueError("--via is gateway or http")
    if not 1 <= p.per_client <= p.guilds:
        raise ValueError("--per-client must be 1..guilds")
    if p.active is not None and not 1 <= p.active <= p.per_client:
        raise ValueError("--active must be 1..per-client")


def assign(plan: Plan) -> list[list[ClientSpec]]:
    """Clients per worker: client ``i`` is in guild ``i % guilds`` and on worker
    ``i % workers``; roles and latency sampling are drawn with the seed."""
    rng = random.Random(plan.seed)
    ids = list(range(plan.clients))
    rng.shuffle(ids)
    n_slow = round(plan.slow_fraction * plan.clients)
    n_churn = round(plan.churn_fraction * plan.clients)
    role = ["stay"] * plan.clients
    for i in ids[:n_slow]:
        role[i] = "slow"
    for i in ids[n_slow : n_slow + n_churn]:
        role[i] = "churn"
    lat_rng = random.Random(plan.seed + 1)
    per: list[list[ClientSpec]] = [[] for _ in range(plan.workers)]
    n, g = plan.per_client, plan.guilds
    stride = max(1, g // n)
    active = plan.active_per_client
    for i in range(plan.clients):
        gids = tuple(f"lt-{(i + k * stride) % g}" for k in range(n))
        spec = ClientSpec(
            i,
            gids,
            role[i],
            lat=lat_rng.random() < plan.lat_sample,
            passive=gids[active:],
            activity_batch=plan.activity_batch,
        )
        per[i % plan.workers].append(spec)
    return per


def worker_cpus(cpus: list[int] | None, wid: int, workers: int) -> list[int] | None:
    """The CPUs subscriber worker ``wid`` is pinned to: with at least as many
    workers as ``--client-cpus``, one CPU each, in turn (the kernel would
    otherwise move busy workers about and let two share a core); else all
    of them."""
    if cpus and len(cpus) > 1 and workers >= len(cpus):
        return [cpus[wid % len(cpus)]]
    return cpus


def default_workers(given: int | None, planned: int, cpus: list[int] | None) -> int:
    """``--workers`` when given; else the scenario's, raised to one worker
    per CPU of ``--client-cpus`` (a machine with more harness cores gets a
    subscriber process on each)."""
    if given is not None:
        return given
    return max(planned, len(cpus or ()))
