"""Protocol 1.1's subprotocol with clients we did not write, and ours.

A client that sends ``Sec-WebSocket-Protocol`` must get ``guildcast.v1``
back (Node's ``ws`` and ``websocket-client`` fail the connection when the
server does not answer an offer), one that offers only unknown names gets
HTTP 400, and one that offers none is served as in 1.0. Chromium is in
tests/browser/test_subprotocol.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from guildcast import Server
from guildcast.client import Client
from guildcast.protocol.codes import SUBPROTOCOL
from tests.support.wait import output

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = ROOT / "clients" / "js"
NODE = shutil.which("node")
NODE_WS = JS_DIR / "node_modules" / "ws" / "package.json"

try:
    import websocket as websocket_client  # the websocket-client package
except ImportError:  # pragma: no cover - depends on the environment
    websocket_client = None  # type: ignore[assignment]


# --- our Python client ---------------------------------------------------------------


async def test_python_client_negotiates_the_subprotocol(server: Server) -> None:
    async with Client(server.url, server.token("py", guilds=["*"], pub=["*"])) as c:
        assert c.subprotocol == "guildcast.v1"
        assert await c.publish("g", "X", 1) == 1


# --- websocket-client (PyPI) ---------------------------------------------------------


def _wsc_session(url: str, token: str, subprotocols: list[str] | None) -> dict[str, Any]:
    """HELLO, IDENTIFY, READY over websocket-client (a blocking client: run
    in a thread, the server shares this test's loop)."""
    assert websocket_client is not None
    ws = websocket_client.create_connection(url, timeout=20, subprotocols=subprotocols)
    try:
        hello = json.loads(ws.recv())
        ws.send(json.dumps({"op": 2, "d": {"token": token, "guilds": {}}}))
        ready = json.loads(ws.recv())
        return {"subprotocol": ws.getsubprotocol(), "hello": hello["op"], "ready": ready["t"]}
    finally:
        ws.close()


@pytest.mark.skipif(
    websocket_client is None, reason="websocket-client missing: pip install -e '.[test]'"
)
@pytest.mark.parametrize(
    "offer,expected",
    [([SUBPROTOCOL], "guildcast.v1"), (["x", SUBPROTOCOL], "guildcast.v1"), (None, None)],
)
async def test_websocket_client(
    server: Server, offer: list[str] | None, expected: str | None
) -> None:
    got = await asyncio.to_thread(_wsc_session, server.url, server.token("wsc"), offer)
    assert got == {"subprotocol": expected, "hello": 10, "ready": "READY"}


@pytest.mark.skipif(
    websocket_client is None, reason="websocket-client missing: pip install -e '.[test]'"
)
async def test_websocket_client_unknown_subprotocol_is_400(server: Server) -> None:
    assert websocket_client is not None
    with pytest.raises(websocket_client.WebSocketBadStatusException) as info:
        await asyncio.to_thread(_wsc_session, server.url, server.token("wsc"), ["chat"])
    assert info.value.status_code == 400
    assert b"guildcast.v1" in (info.value.resp_body or b"")


# --- Node's ws (npm) -------------------------------------------------------------------

#: Connects with Node's ws for each offer in argv[3] (JSON) and prints one
#: JSON line per offer: the agreed protocol and the first two messages, or
#: the HTTP status and body of a refusal.
NODE_SCRIPT = r"""
const { createRequire } = require("node:module");
const WebSocket = createRequire(process.argv[2])("ws");
const [url, token, offers] = [process.argv[3], process.argv[4], JSON.parse(process.argv[5])];
function once(offer) {
  return new Promise((resolve) => {
    const ws = offer === null ? new WebSocket(url) : new WebSocket(url, offer);
    const got = [];
    ws.on("unexpected-response", (req, res) => {
      let body = "";
      res.on("data", (c) => (body += c));
      res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    ws.on("error", (err) => resolve({ error: String(err) }));
    ws.on("message", (data) => {
      const m = JSON.parse(String(data));
      got.push(m.op === 10 ? "HELLO" : m.t);
      if (m.op === 10) ws.send(JSON.stringify({ op: 2, d: { token, guilds: {} } }));
      else { ws.close(); resolve({ protocol: ws.protocol, got }); }
    });
  });
}
(async () => {
  for (const offer of offers) console.log(JSON.stringify(await once(offer)));
})();
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.skipif(
    not NODE_WS.exists(), reason="Node's ws is not installed: npm ci --prefix clients/js"
)
async def test_node_ws(server: Server, tmp_path: Path) -> None:
    assert NODE is not None
    script = tmp_path / "ws_client.cjs"
    script.write_text(NODE_SCRIPT)
    offers = [SUBPROTOCOL, ["chat", SUBPROTOCOL], None, "chat"]
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(script),
        str(JS_DIR / "package.json"),
        server.url,
        server.token("node"),
        json.dumps(offers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    text = await output(proc, 60)
    assert proc.returncode == 0, text
    lines = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    assert len(lines) == 4, text
    ok = {"protocol": "guildcast.v1", "got": ["HELLO", "READY"]}
    assert lines[0] == ok and lines[1] == ok
    assert lines[2] == {"protocol": "", "got": ["HELLO", "READY"]}
    assert lines[3]["status"] == 400 and "guildcast.v1" in lines[3]["body"], lines[3]
