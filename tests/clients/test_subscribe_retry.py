"""Both of our clients retry a SUBSCRIBE the server answers with ERROR 1013
(PROTOCOL.md "Refusals": try that guild again later) with full-jitter
backoff instead of dropping the guild, against a real node.

The node refuses with 1013 because the user's subscriptions already hold
``user_guild_share`` of ``max_guilds`` (one guild here); the refusal lasts
until another user's session starts the guild (then it is nobody's new
guild to charge), which is what each test does while its client retries.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from guildcast.client import Backoff, Client, Event
from tests.clients.test_js_client import node_flags
from tests.support.gateway import session
from tests.support.node import node
from tests.support.wait import TIMEOUT, output, until

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
FAST = {"base": 0.02, "cap": 0.2}
#: One new guild per user: the second a user asks for is refused with 1013.
ONE_GUILD_A_USER = {"max_guilds": 4, "user_guild_share": 0.25}


async def test_python_client_retries_a_subscribe_refused_with_1013() -> None:
    async with node(**ONE_GUILD_A_USER) as srv:
        tok = srv.token("u", guilds=["*"], pub=["*"])
        async with Client(srv.url, tok, guilds=["mine"], backoff=Backoff(**FAST)) as c:
            await c.subscribe("mine")
            waiting = asyncio.ensure_future(c.subscribe("wanted"))
            # Refused and asked again, more than once, without giving up.
            await until(lambda: c.counters["subscribe_retries"] >= 3, "retries of the refusal")
            assert not waiting.done()
            assert "wanted" in c.positions
            assert srv.hub.share_refused >= 3
            # Another user's session takes the guild: the next retry gets in.
            other, _ = await session(srv.url, srv.token("v", guilds=["*"]), {"wanted": None})
            async with asyncio.timeout(TIMEOUT):
                pos = await waiting
            assert pos.s == 0
            s = await c.publish("wanted", "HELLO", {"n": 1})
            async with asyncio.timeout(TIMEOUT):
                async for item in c.events():
                    if isinstance(item, Event) and item.guild == "wanted":
                        assert (item.s, item.data) == (s, {"n": 1})
                        break
            assert c.counters["gave_up"] == 0 and c.sessions == 1
            await other.close()


#: guildcast.js over Node's WebSocket: user u follows "mine", asks for
#: "wanted" (refused, 1013) and prints each "subscriberetry"; after three,
#: user v subscribes "wanted" too, and u's pending subscribe resolves.
JS_SCRIPT = r"""
const { GuildcastClient } = await import(process.argv[2]);
const [url, tokU, tokV] = process.argv.slice(3);
const backoff = { base: 0.02, cap: 0.2 };
const u = new GuildcastClient(url, { token: tokU, guilds: ["mine"], backoff });
const v = new GuildcastClient(url, { token: tokV, backoff });
let retries = 0;
let released = null;
const third = new Promise((resolve) => (released = resolve));
u.on("subscriberetry", (e) => {
  console.log(JSON.stringify({ retry: e.guild, code: e.code, delay: e.delay }));
  if (++retries === 3) released();
});
await u.connect();
const wanted = u.subscribe("wanted");
await third;
await v.connect();
await v.subscribe("wanted");
const pos = await wanted;
console.log(JSON.stringify({ subscribed: pos, counters: u.counters, sessions: u.sessions }));
await u.close();
await v.close();
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed (needs Node >= 20)")
async def test_js_client_retries_a_subscribe_refused_with_1013(tmp_path: Path) -> None:
    assert NODE is not None
    script = tmp_path / "retry.mjs"
    script.write_text(JS_SCRIPT)
    lib = (ROOT / "clients" / "js" / "guildcast.js").as_uri()
    async with node(**ONE_GUILD_A_USER) as srv:
        proc = await asyncio.create_subprocess_exec(
            NODE,
            *node_flags(),
            str(script),
            lib,
            srv.url,
            srv.token("u", guilds=["*"]),
            srv.token("v", guilds=["*"]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        text = await output(proc, 60)
    assert proc.returncode == 0, text
    lines = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    retries = [ln for ln in lines if "retry" in ln]
    assert len(retries) >= 3, text
    assert all(r["retry"] == "wanted" and r["code"] == 1013 for r in retries), text
    # Full jitter within the floor's window of the fast backoff (at most 0.08 s).
    assert all(0 <= r["delay"] <= 0.2 for r in retries), text
    (done,) = [ln for ln in lines if "subscribed" in ln]
    assert done["subscribed"]["s"] == 0, text
    assert done["counters"]["subscribe_retries"] >= 3 and done["counters"]["gave_up"] == 0
    assert done["sessions"] == 1, text
