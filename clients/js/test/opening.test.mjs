// Openings that fail, without a Guildcast server: a refused connection and a
// listener that never answers the upgrade. Each must end the attempt and
// retry per the backoff (Node 20's WebSocket fires only "error" for a failed
// opening, never "close": a client waiting for the close hung there for
// good), so with maxAttempts the client stops with ReconnectFailed.
import test from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { GuildcastClient, ReconnectFailed } from "../guildcast.js";

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
