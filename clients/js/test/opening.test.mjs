// Openings that fail, without a Guildcast server: a refused connection and a
// listener that never answers the upgrade. Each must end the attempt and
// retry per the backoff (Node 20's WebSocket fires only "error" for a failed
// opening, never "close": a client waiting for the close hung there for
// good), so with maxAttempts the client stops with ReconnectFailed.
import test from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { WebSocketServer } from "ws";
import { Backoff, GuildcastClient, REFUSED_WINDOW, ReconnectFailed } from "../guildcast.js";

const ATTEMPTS = 3;
const BACKOFF = { base: 0.01, cap: 0.02, maxAttempts: ATTEMPTS };

function listen(onConnection = () => {}) {
  const sockets = new Set();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    onConnection(s);
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () => {
      const stop = () => {
        for (const s of sockets) s.destroy();
        return new Promise((done) => server.close(done));
      };
      resolve({ port: server.address().port, stop });
    }),
  );
}

async function stopsAfterRetries(url, options) {
  const c = new GuildcastClient(url, { token: "t", backoff: BACKOFF, ...options });
  const codes = [];
  c.on("disconnect", (d) => codes.push(d.code));
  try {
    await assert.rejects(c.connect(), ReconnectFailed);
    return codes;
  } finally {
    await c.close();
  }
}

test("a refused connection is retried, then stops with ReconnectFailed", { timeout: 20000 }, async () => {
  const { port, stop } = await listen();
  await stop(); // nothing listens there now: every connection is refused
  const codes = await stopsAfterRetries(`ws://127.0.0.1:${port}/gateway`, {});
  assert.deepEqual(codes, Array(ATTEMPTS).fill(1006));
});

test("an upgrade never answered ends at openTimeout and is retried", { timeout: 20000 }, async () => {
  const { port, stop } = await listen();
  try {
    const codes = await stopsAfterRetries(`ws://127.0.0.1:${port}/gateway`, { openTimeout: 200 });
    assert.deepEqual(codes, Array(ATTEMPTS).fill(4000));
  } finally {
    await stop();
  }
});

// PROTOCOL.md "Pacing": a refused connect is tried again soon, without
// growing the backoff (no RECONNECT: a draw within REFUSED_WINDOW s, here the
// backoff's cap), or exactly the width of the last RECONNECT's range.
test("refused connects do not grow the backoff", { timeout: 20000 }, async () => {
  const { port, stop } = await listen();
  await stop();
  const backoff = new Backoff({ base: 5, cap: 0.05, maxAttempts: ATTEMPTS });
  const c = new GuildcastClient(`ws://127.0.0.1:${port}/gateway`, { token: "t", backoff });
  const delays = [];
  c.on("disconnect", (d) => delays.push(d.delay));
  try {
    await assert.rejects(c.connect(), ReconnectFailed);
  } finally {
    await c.close();
  }
  assert.equal(c.counters.refused_connects, ATTEMPTS);
  assert.equal(delays.length, ATTEMPTS);
  assert.ok(delays.every((d) => d >= 0 && d <= Math.min(REFUSED_WINDOW, 0.05)), String(delays));
  assert.equal(backoff.attempt, 0);
});

test("after a RECONNECT range, refused connects wait its width", { timeout: 20000 }, async () => {
  // A server that says RECONNECT {0, 300} and 1001, then stops listening.
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((r) => wss.on("listening", r));
  const { port } = wss.address();
  wss.on("connection", (ws) => {
    ws.send(JSON.stringify({ op: 10, d: { heartbeat_interval: 45000 } }));
    ws.send(JSON.stringify({ op: 7, d: { min_delay_ms: 0, max_delay_ms: 300 } }));
    ws.close(1001, "server shutting down");
    wss.close();
  });
  const c = new GuildcastClient(`ws://127.0.0.1:${port}/gateway`, { token: "t", backoff: { base: 0.01, cap: 0.02, maxAttempts: 4 } });
  const seen = [];
  c.on("disconnect", (d) => seen.push([d.code, d.delay]));
  try {
    await assert.rejects(c.connect(), ReconnectFailed);
  } finally {
    await c.close();
  }
  assert.equal(seen[0][0], 1001);
  assert.ok(seen[0][1] >= 0 && seen[0][1] <= 0.3, String(seen[0]));
  assert.deepEqual(seen.slice(1), [[1006, 0.3], [1006, 0.3], [1006, 0.3]]);
  assert.equal(c.counters.refused_connects, 3);
});
