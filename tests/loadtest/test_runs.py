"""The harness's bulk read of a chunk of load-test DISPATCHes
(``wire.regular_run``, ``wire.RunReader``) against the per-frame path it
stands in for: the same frames, the same fields, the same checks."""

from __future__ import annotations

import asyncio
import random
import socket
import time

import orjson

from guildcast.loadtest import fleet as fl
from guildcast.loadtest import wire
from guildcast.protocol import wire as pw
from guildcast.protocol.codes import Op
from guildcast.protocol.frames import scan_frames, server_frame, text_frame

PAD = wire.pad_for(200)


def event(gid: str, s: int, ts: int | None = None, pad: bytes = PAD) -> bytes:
    """One DISPATCH frame of a load-test event, by the server's own builders."""
    ts = time.time_ns() // 1000 if ts is None else ts
    return text_frame(pw.dispatch_json(gid, wire.EVENT, s, wire.event_data(ts, pad)))


HEARTBEAT_ACK = text_frame(orjson.dumps({"op": Op.HEARTBEAT_ACK}))


def walk(chunk: bytes) -> list[tuple[int, int, bytes | None, int | None, int | None]]:
    """Every complete frame of ``chunk`` as ``(first byte, end, gid, s, ts)``
    by the frame scanner and a full JSON parse (None where not an event)."""
    spans, _, err = scan_frames(chunk)
    assert err is None
    out: list[tuple[int, int, bytes | None, int | None, int | None]] = []
    for b0, p, end in spans:
        msg = orjson.loads(chunk[p:end]) if b0 == 0x81 else {}
        if msg.get("op") == Op.DISPATCH and msg.get("t") == wire.EVENT:
            out.append((b0, end, msg["g"].encode(), msg["s"], msg["d"]["ts"]))
        else:
            out.append((b0, end, None, None, None))
    return out


def test_a_run_is_what_a_frame_walk_finds() -> None:
    rng = random.Random(5)
    taken = 0
    for _ in range(400):
        frames: list[bytes] = []
        s = rng.choice([1, 8, 95, 990, 99_995])
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.85:
                frames.append(event(rng.choice(["7", "8", "77", "team-a"]), s))
                s += rng.choice([1, 1, 1, 2, 0])
            elif kind < 0.95:
                frames.append(HEARTBEAT_ACK)
            else:
                frames.append(event("7", s, pad=b"y" * rng.randint(0, 300)))
        whole = b"".join(frames)
        chunk = whole[: rng.randint(1, len(whole))]
        run = wire.regular_run(chunk)
        walked = walk(chunk)
        if run is None:
            # Refused only when no frame of one length opens the chunk.
            assert not walked or walked[0][2] is None or len(chunk) < 4
            continue
        taken += 1
        end, found = run
        assert 1 <= len(found) <= len(walked)
        for (b0, _, gid, s_, ts), (g, sd, tsd) in zip(walked, found, strict=False):
            assert b0 == 0x81 and gid == g and s_ == int(sd) and ts == int(tsd)
        assert walked[len(found) - 1][1] == end
    assert taken > 200


def test_what_is_not_a_run() -> None:
    good = event("7", 5) + event("7", 6)
    assert wire.regular_run(good) is not None
    n = len(event("7", 5)) - 4  # 200-byte events: 4-byte headers
    body = event("7", 5)[4:]
    cases = {
        "announced longer than it is": bytes((0x81, 126)) + (n + 1).to_bytes(2, "big") + body,
        "compressed (RSV1)": bytes((0xC1,)) + good[1:],
        "not final": bytes((0x01,)) + good[1:],
        "masked": bytes((0x81, 126 | 0x80)) + good[2:],
        "other key order": text_frame(b'{"op":0,"g":"7","t":"LT","s":5,"d":{"ts":1}}') * 2,
        "escaped guild id": event('7"', 5) * 2,
        "short ts": text_frame(pw.dispatch_json("7", "LT", 5, b'{"ts":12,"pad":""}')) * 2,
        "a control frame": server_frame(0x9, b"ping") + good,
        "partial": good[:30],
    }
    for why, chunk in cases.items():
        run = wire.regular_run(chunk)
        assert run is None, why
    # Announced one byte short: the frame ends where its header says, as a
    # frame walk has it, and the byte left over is no frame of the run.
    short = bytes((0x81, 126)) + (n - 1).to_bytes(2, "big") + body
    run = wire.regular_run(short + event("7", 6))
    assert run is not None and run[0] == n + 3 and len(run[1]) == 1
    assert scan_frames(short)[0][0][2] == n + 3
    # A run ends where another length begins: the rest is the frame loop's.
    mixed = event("7", 10) + event("7", 11) + HEARTBEAT_ACK + event("7", 12)
    run = wire.regular_run(mixed)
    assert run is not None and len(run[1]) == 2
    assert run[0] == len(event("7", 10)) * 2
    # A first frame alone is a run of one.
    run = wire.regular_run(event("7", 9) + HEARTBEAT_ACK)
    assert run is not None and run[0] == len(event("7", 9)) and run[1][0][1] == b"9"


class NoRuns(wire.RunReader):
    """The reference: every chunk goes to the per-frame loop."""

    def read(self, data: bytes) -> wire.Run | None:
        return None


def stream(rng: random.Random) -> list[bytes]:
    """Chunks of events for guilds 1 and 2 with gaps, duplicates, a guild
    the client is not in, heartbeat ACKs, split at random points."""
    frames: list[bytes] = []
    s = {"1": 0, "2": 0}
    for _ in range(3000):
        r = rng.random()
        if r < 0.01:
            frames.append(HEARTBEAT_ACK)
            continue
        g = "1" if rng.random() < 0.7 else "2"
        if r < 0.02:
            g = "3"  # not subscribed: unexpected
        step = 1
        if 0.02 <= r < 0.03:
            step = rng.randint(2, 5)  # a gap
        elif 0.03 <= r < 0.04:
            step = 0  # a duplicate
        cur = s.get(g, 0) + step
        s[g] = cur
        # Runs of one guild, as a server batch is.
        k = rng.choice([1, 1, 4, 8])
        frames.extend(event(g, cur + i) for i in range(k))
        s[g] = cur + k - 1
    whole = b"".join(frames)
    chunks: list[bytes] = []
    i = 0
    while i < len(whole):
        j = i + rng.choice([240, 480, 1936, 2000, 4096, rng.randint(1, 5000)])
        chunks.append(whole[i:j])
        i = j
    return chunks


def counters(f: fl.Fleet, c: fl.Sub) -> dict[str, object]:
    f.fold()
    return {
        "delivered": f.delivered,
        "gaps": f.gaps,
        "gap_events": f.gap_events,
        "dups": f.dups,
        "unexpected": f.unexpected,
        "protocol_errors": f.protocol_errors,
        "last": dict(c.last),
        "latencies": f.hist.get_total_count(),
        "rest": c.rest,
    }


async def test_runs_check_what_the_frame_loop_checks() -> None:
    rng = random.Random(11)
    chunks = stream(rng)
    results = []
    for reader in (NoRuns(), wire.RunReader()):
        # Real sockets for the clients' transports; the far ends are not read.
        pairs = [socket.socketpair() for _ in range(2)]
        spec = fl.FleetSpec(
            wid=0,
            host="127.0.0.1",
            port=1,
            path="/gateway",
            token="t",
            clients=[fl.ClientSpec(0, ("1", "2")), fl.ClientSpec(1, ("1", "2"))],
        )
        f = fl.Fleet(spec)
        f.runs = reader
        try:
            for c in f.clients:
                sock = pairs[c.spec.cid][0]
                loop = asyncio.get_running_loop()
                await loop.create_connection(lambda c=c: c, sock=sock)  # type: ignore[misc]
                c.state = fl.LIVE
                c.last = {b"1": 0, b"2": 0}
            for chunk in chunks:
                for c in f.clients:  # the same chunk twice: the second from memory
                    c.data_received(chunk)
            results.append(counters(f, f.clients[0]))
            if not isinstance(reader, NoRuns):
                assert reader.hits == reader.misses > 1000
        finally:
            for c in f.clients:
                if c.transport is not None:
                    c.transport.abort()
            for _, far in pairs:
                far.close()
    ref, fast = results
    assert ref == fast
    assert ref["gaps"] and ref["dups"] and ref["unexpected"]
