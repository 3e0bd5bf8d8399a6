"""Bytes on the wire with and without permessage-deflate, for a realistic mix.

An embedded node (compression on, its defaults) and two subscribers of one
guild on loopback: one offers permessage-deflate as a browser does, one
offers nothing. The node publishes, kind after kind, chat messages (JSON
of a few hundred bytes: author, channel, text of common words), 4 KiB
dashboard snapshots (a list of services with their figures) and tiny
ticks (below the compression threshold). Each subscriber counts the bytes
of event frames it receives and decodes them (the compressed one with one
inflater, as any client of a ``server_no_context_takeover`` server may);
both must read the same texts. It prints, per kind, the bytes each received
and their ratio, and the node's compressor's CPU time per message (the
thread's CPU clock around compressing each kind's payloads once more with
the node's settings); then how well chat messages cut to sizes from 48 to
512 bytes compress (what ``--compression-threshold`` is chosen from).
Loopback only, bounded (a few thousand events):

    guildcast loadtest wiresize [--chat 2000] [--snapshots 300] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from guildcast.loadtest import wire
from guildcast.protocol.deflate import RSV1, Deflater
from guildcast.protocol.frames import OP_TEXT, client_frame, scan_frames

PROG = "guildcast loadtest wiresize"
GID = "wiresize"
#: The token secret of the throwaway node (loopback, this run only).
SECRET = "wiresize-secret-0123456789abcdef0123"

_WORDS = (
    "ok so the deploy went fine but the cache is cold again see the graph i think we "
    "should roll back before lunch thanks for the review merged it lgtm can you check "
    "why the build is red on main it was green an hour ago meeting moved to three"
).split()


def chat(rng: random.Random) -> dict[str, Any]:
    """A chat message: a few hundred bytes of JSON."""
    return {
        "id": str(rng.getrandbits(62)),
        "channel_id": str(rng.getrandbits(40)),
        "author": {"id": str(rng.getrandbits(40)), "username": rng.choice(["alice", "bob"])},
        "content": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 40))),
        "timestamp": f"2026-12-02T01:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.123Z",
        "mentions": [],
        "attachments": [],
    }


def snapshot(rng: random.Random) -> dict[str, Any]:
    """A dashboard snapshot: about 4 KiB of JSON."""
    return {
        "ts": 1764637200 + rng.randint(0, 3600),
        "services": [
            {
                "name": f"svc-{k}",
                "status": rng.choice(["ok", "ok", "ok", "degraded"]),
                "p50_ms": round(rng.uniform(1, 30), 2),
                "p99_ms": round(rng.uniform(30, 400), 2),
                "rps": rng.randint(10, 5000),
                "errors": rng.randint(0, 20),
                "region": rng.choice(["eu-west-1", "us-east-1", "ap-south-1"]),
            }
            for k in range(37)
        ],
    }


def tick(rng: random.Random) -> dict[str, Any]:
    """A tiny event (below the compression threshold)."""
    return {"n": rng.randint(0, 10**6)}


KINDS: dict[str, tuple[str, Callable[[random.Random], dict[str, Any]]]] = {
    "chat": ("MESSAGE_CREATE", chat),
    "snapshot": ("DASHBOARD", snapshot),
    "tick": ("TICK", tick),
}


class Subscriber:
    """A raw subscriber counting the bytes of the event frames it receives."""

    def __init__(self, deflate: bool) -> None:
        self.deflate = deflate
        self.inflater = wire.Inflater()
        self.event_bytes = 0
        self.texts: list[bytes] = []
        self.compressed = 0
        self._buf = b""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.extensions = ""

    async def open(self, port: int, token: str) -> None:
        up = wire.Upgrade("127.0.0.1", port, "/gateway", self.deflate)
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer.write(up.request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        done, err, rest = up.receive(head)
        if not done or err is not None:
            raise RuntimeError(f"upgrade failed: {err}")
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("sec-websocket-extensions:"):
                self.extensions = line.split(":", 1)[1].strip()
        self._buf = rest
        await self._next()  # HELLO
        ident = {"op": 2, "d": {"token": token, "guilds": {GID: None}}}
        self._writer.write(client_frame(OP_TEXT, orjson.dumps(ident)))
        await self._next()  # READY
        await self._next()  # SUBSCRIBED

    async def _next(self) -> tuple[int, bytes]:
        """The next message: ``(its frame's bytes on the wire, its text)``."""
        assert self._reader is not None
        while True:
            spans, _, err = scan_frames(self._buf, limit=1)
            if err is not None:
                raise RuntimeError(err)
            if spans:
                b0, p, q = spans[0]
                frame, body, self._buf = self._buf[:q], self._buf[p:q], self._buf[q:]
                if b0 & RSV1:
                    self.compressed += 1
                    body = self.inflater.inflate(body)
                return len(frame), body
            data = await self._reader.read(1 << 16)
            if not data:
                raise RuntimeError("the server closed")
            self._buf += data

    async def events(self, n: int) -> None:
        for _ in range(n):
            size, text = await self._next()
            self.event_bytes += size
            self.texts.append(text)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


#: Message sizes of the threshold table (bytes).
SIZES = (48, 64, 96, 128, 160, 192, 256, 384, 512)


def size_table(rng: random.Random, n: int = 300) -> dict[int, float]:
    """Compressed / plain bytes of chat messages cut to each of :data:`SIZES`
    (what the threshold is chosen from: below it, compressing saves little)."""
    from guildcast.protocol import wire as pw

    # Two chat messages per event, so that every one is longer than 512 bytes.
    msgs = [
        pw.dispatch_json(GID, "MESSAGES", k, orjson.dumps([chat(rng), chat(rng)])) for k in range(n)
    ]
    out: dict[int, float] = {}
    for size in SIZES:
        z = Deflater(0)
        cut = [m[:size] for m in msgs]
        out[size] = round(sum(len(z.compress(m)) for m in cut) / sum(map(len, cut)), 3)
    return out


def compress_cost(payloads: list[bytes], threshold: int) -> float:
    """Microseconds of this thread's CPU per payload to compress each once."""
    z = Deflater(threshold)
    t0 = time.thread_time()
    for p in payloads:
        z.text(p)
    return (time.thread_time() - t0) / max(1, len(payloads)) * 1e6


async def measure(counts: dict[str, int], seed: int) -> dict[str, Any]:
    from guildcast import Config, Server
    from guildcast.protocol import wire as pw

    rng = random.Random(seed)
    out: dict[str, Any] = {"kinds": {}}
    cfg = Config(host="127.0.0.1", port=0, secret=SECRET, history_size=10)
    async with Server(cfg) as srv:
        z, plain = Subscriber(True), Subscriber(False)
        for sub in (z, plain):
            await sub.open(srv.port, srv.token(f"wiresize-{sub.deflate}"))
        out["negotiated"] = z.extensions
        out["threshold"] = cfg.compression_threshold
        for kind, n in counts.items():
            t, make = KINDS[kind]
            z.event_bytes = plain.event_bytes = 0
            envelopes: list[bytes] = []
            for _ in range(n):
                d = make(rng)
                s = await srv.publish(GID, t, d)
                envelopes.append(pw.dispatch_json(GID, t, s, orjson.dumps(d)))
            await asyncio.gather(z.events(n), plain.events(n))
            if z.texts != plain.texts:
                raise RuntimeError(f"{kind}: the compressed subscriber read other texts")
            z.texts.clear()
            plain.texts.clear()
            out["kinds"][kind] = {
                "events": n,
                "mean_message_bytes": round(sum(map(len, envelopes)) / n, 1),
                "plain_bytes": plain.event_bytes,
                "deflate_bytes": z.event_bytes,
                "ratio": round(z.event_bytes / plain.event_bytes, 3),
                "compress_us_per_message": round(
                    compress_cost(envelopes, cfg.compression_threshold), 2
                ),
            }
        total_plain = sum(k["plain_bytes"] for k in out["kinds"].values())
        total_z = sum(k["deflate_bytes"] for k in out["kinds"].values())
        out["total"] = {
            "plain_bytes": total_plain,
            "deflate_bytes": total_z,
            "ratio": round(total_z / total_plain, 3) if total_plain else None,
            "compressed_frames": z.compressed,
        }
        for sub in (z, plain):
            sub.close()
    out["ratio_by_size"] = size_table(rng)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--chat", type=int, default=2000, help="chat messages (2000)")
    ap.add_argument("--snapshots", type=int, default=300, help="4 KiB snapshots (300)")
    ap.add_argument("--ticks", type=int, default=500, help="tiny events (500)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="write the result as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    counts = {"chat": args.chat, "snapshot": args.snapshots, "tick": args.ticks}
    if any(not 0 < n <= 100_000 for n in counts.values()):
        print(f"{PROG}: counts must be in 1..100000")
        return 2
    result = asyncio.run(measure(counts, args.seed))
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"negotiated: {result['negotiated']} (threshold {result['threshold']} bytes)")
    for kind, k in result["kinds"].items():
        print(
            f"{kind:9} {k['events']:6} events of {k['mean_message_bytes']:7.1f} B: "
            f"{k['plain_bytes']:9} -> {k['deflate_bytes']:9} bytes, ratio {k['ratio']:.3f}, "
            f"compress {k['compress_us_per_message']} us/message"
        )
    t = result["total"]
    print(f"total     {t['plain_bytes']} -> {t['deflate_bytes']} bytes, ratio {t['ratio']}")
    sizes = ", ".join(f"{k} B: {v}" for k, v in result["ratio_by_size"].items())
    print(f"compressed/plain of chat messages cut to a size: {sizes}")
    return 0
