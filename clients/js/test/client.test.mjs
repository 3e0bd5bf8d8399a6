// Integration tests of guildcast.js against a real Guildcast server.
// tests/clients/test_js_client.py starts the server and a small control
// endpoint, then runs `node --test clients/js/test/` with:
//   GUILDCAST_URL            ws://127.0.0.1:PORT/gateway
//   GUILDCAST_TOKEN          all guilds, may publish everywhere
//   GUILDCAST_TOKEN_LIMITED  guilds and publishing limited to "js-*"
//   GUILDCAST_CONTROL        http://127.0.0.1:PORT (GET /publish, /disconnect, /restart)
// Without them these tests are skipped.
import test from "node:test";
import assert from "node:assert/strict";
import {
  AuthenticationFailed,
  GuildcastClient,
  GuildcastClosed,
  IDEMPOTENCY_CONFLICT,
  PublishError,
  SubscribeError,
} from "../guildcast.js";

const { GUILDCAST_URL: URL_, GUILDCAST_TOKEN: TOKEN, GUILDCAST_TOKEN_LIMITED: LIMITED, GUILDCAST_CONTROL: CONTROL } = process.env;
const skip = URL_ && TOKEN && LIMITED && CONTROL ? false : "needs a server: run tests/clients/test_js_client.py";
// Fast reconnects for tests; the defaults are 0.5 s base and 30 s cap.
const BACKOFF = { base: 0.05, cap: 0.5 };

async function control(path) {
  const res = await fetch(CONTROL + path);
  const text = await res.text();
  assert.equal(res.status, 200, text);
  return JSON.parse(text);
}

async function waitFor(pred, what, ms = 20000) {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function recorder(client) {
  const items = [];
  client.on("event", (e) => items.push({ kind: "event", ...e }));
  client.on("resync", (e) => items.push({ kind: "resync", ...e }));
  return items;
}

test("connect, subscribe, publish: ACKed s matches the delivered event", { skip }, async () => {
  const c = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF });
  const items = recorder(c);
  try {
    await c.connect();
    assert.equal(c.user, "js-tester");
    assert.equal(c.subprotocol, "guildcast.v1"); // protocol 1.1: offered and echoed
    const pos = await c.subscribe("js-basic");
    assert.equal(typeof pos.epoch, "string");
    const s = await c.publish("js-basic", "CARD_ADDED", { text: "hello" });
    assert.equal(s, pos.s + 1);
    await waitFor(() => items.length === 1, "the event");
    assert.deepEqual(items[0], { kind: "event", guild: "js-basic", name: "CARD_ADDED", s, data: { text: "hello" } });
    await c.unsubscribe("js-basic");
    await c.publish("js-basic", "CARD_ADDED", { text: "after" });
    await c.publish("js-other", "CARD_ADDED", {}); // a round trip after the one above
    assert.equal(items.length, 1, "no event after unsubscribe");
  } finally {
    await c.close();
  }
});

test("idempotencyKey (1.1): a retry resolves with the original s; other data is 4409", { skip }, async () => {
  const c = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF });
  const items = recorder(c);
  try {
    await c.connect();
    const pos = await c.subscribe("js-idem");
    const key = `js-${Date.now()}-${Math.random()}`;
    const s = await c.publish("js-idem", "PAID", { n: 1 }, { idempotencyKey: key });
    assert.equal(await c.publish("js-idem", "PAID", { n: 1 }, { idempotencyKey: key }), s);
    await assert.rejects(
      c.publish("js-idem", "PAID", { n: 2 }, { idempotencyKey: key }),
      (e) => e instanceof PublishError && e.code === IDEMPOTENCY_CONFLICT,
    );
    await assert.rejects(c.publish("js-idem", "PAID", 1, { idempotencyKey: "a b" }), TypeError);
    const next = await c.publish("js-idem", "END", null);
    assert.equal(next, s + 1);
    await waitFor(() => items.length === 2, "the two events");
    assert.deepEqual(items.map((e) => e.s), [pos.s + 1, pos.s + 2]);
  } finally {
    await c.close();
  }
});

test("ERROR 4403 rejects subscribe and publish; the connection stays", { skip }, async () => {
  const c = new GuildcastClient(URL_, { token: LIMITED, backoff: BACKOFF });
  try {
    await c.connect();
    await assert.rejects(c.subscribe("secret-guild"), (e) => e instanceof SubscribeError && e.code === 4403);
    await assert.rejects(c.publish("secret-guild", "X", 1), (e) => e instanceof PublishError && e.code === 4403);
    const pos = await c.subscribe("js-allowed");
    assert.ok(pos.s >= 0);
    assert.ok(c.connected);
    assert.equal(c.sessions, 1);
  } finally {
    await c.close();
  }
});

test("a refused token stops the client with AuthenticationFailed (4004)", { skip }, async () => {
  const c = new GuildcastClient(URL_, { token: "not-a-token", backoff: BACKOFF });
  let closed = null;
  c.on("closed", (d) => (closed = d));
  await assert.rejects(c.connect(), (e) => e instanceof AuthenticationFailed && e.code === 4004);
  assert.equal(closed.code, 4004);
  await c.close();
});

test("tokenProvider: one 4004 is retried with a fresh token", { skip }, async () => {
  const tokens = ["expired-or-bad", TOKEN];
  let calls = 0;
  const c = new GuildcastClient(URL_, { tokenProvider: async () => tokens[Math.min(calls++, 1)], backoff: BACKOFF });
  try {
    await c.connect();
    assert.equal(calls, 2);
    assert.equal(c.user, "js-tester");
  } finally {
    await c.close();
  }
});

test("4010 and 4009: reconnects, recovers, every event exactly once and in order", { skip }, async () => {
  const codes = [];
  const c = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF, guilds: ["js-stream"] });
  c.on("disconnect", (d) => codes.push(d.code));
  const items = recorder(c);
  try {
    await c.connect();
    await waitFor(() => c.positions["js-stream"] !== null, "SUBSCRIBED");
    await control("/publish?guild=js-stream&from=1&to=20");
    await waitFor(() => items.length >= 5, "some events");
    await control("/disconnect?code=4010");
    await control("/publish?guild=js-stream&from=21&to=40");
    await waitFor(() => c.sessions === 2 && items.length === 40, "recovery after 4010");
    // 4009: stop heartbeating; the server (300 ms interval) times the session out.
    c.pauseHeartbeats(1500);
    await waitFor(() => codes.includes(4009), "close 4009");
    await control("/publish?guild=js-stream&from=41&to=60");
    await waitFor(() => items.length === 60, "events after 4009");
    assert.deepEqual(codes.slice(0, 2), [4010, 4009]);
    assert.deepEqual(items.map((i) => i.data), Array.from({ length: 60 }, (_, i) => i + 1));
    assert.ok(items.every((i) => i.kind === "event"), "no resync: history covered the gap");
  } finally {
    await c.close();
  }
});

test("rewind (1.1): a fresh client gets the last events, then live; a reconnect recovers and never rewinds again", { skip }, async () => {
  await control("/publish?guild=js-rewind&from=1&to=6");
  await control("/publish?guild=js-rewind-2&from=1&to=3");
  const c = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF, guilds: ["js-rewind"], rewind: 4 });
  const items = recorder(c);
  try {
    await c.connect();
    await waitFor(() => items.length === 4, "the rewind");
    assert.deepEqual(items.map((i) => [i.s, i.data]), [[3, 3], [4, 4], [5, 5], [6, 6]]);
    await control("/publish?guild=js-rewind&from=7&to=7");
    await waitFor(() => items.length === 5, "a live event");
    await control("/disconnect?code=4000");
    await control("/publish?guild=js-rewind&from=8&to=9");
    await waitFor(() => c.sessions === 2 && items.length === 7, "recovery after 4000");
    assert.deepEqual(items.map((i) => i.s), [3, 4, 5, 6, 7, 8, 9]);
    assert.ok(items.every((i) => i.kind === "event"), "no resync");
    assert.equal(c.duplicatesDropped, 0, "the reconnect recovered from its Position, not by rewinding again");
    // subscribe(gid, null, { rewind }): resolves with the Position before the replay.
    const pos = await c.subscribe("js-rewind-2", null, { rewind: 2 });
    assert.equal(pos.s, 1);
    await waitFor(() => items.length === 9, "the second rewind");
    assert.deepEqual(items.slice(7).map((i) => [i.guild, i.s]), [["js-rewind-2", 2], ["js-rewind-2", 3]]);
    await assert.rejects(c.subscribe("js-x", { epoch: "e", s: 1 }, { rewind: 2 }), TypeError);
    await assert.rejects(c.subscribe("js-x", null, { rewind: 0 }), TypeError);
  } finally {
    await c.close();
  }
});

test("server restart (1001): reconnects; a new epoch is reported as resync", { skip }, async () => {
  const c = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF, guilds: ["js-restart"] });
  const items = recorder(c);
  const codes = [];
  c.on("disconnect", (d) => codes.push(d.code));
  try {
    await c.connect();
    await c.publish("js-restart", "N", 1);
    await waitFor(() => items.length === 1, "first event");
    const oldEpoch = c.positions["js-restart"].epoch;
    await control("/restart");
    await waitFor(() => items.some((i) => i.kind === "resync"), "resync");
    assert.equal(codes[0], 1001);
    const resync = items.find((i) => i.kind === "resync");
    assert.notEqual(resync.epoch, oldEpoch);
    assert.equal(resync.guild, "js-restart");
    await c.publish("js-restart", "N", 2);
    await waitFor(() => items.length === 3, "event after restart");
    assert.deepEqual(items.map((i) => i.kind), ["event", "resync", "event"]);
    assert.equal(items[2].s, resync.s + 1);
  } finally {
    await c.close();
  }
});

test("a 'fix the client' close code (4002) stops the client for good", { skip }, async () => {
  const c = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF });
  const closed = new Promise((resolve) => c.on("closed", resolve));
  await c.connect();
  await control("/disconnect?code=4002");
  const detail = await closed;
  assert.equal(detail.code, 4002);
  assert.ok(detail.error instanceof GuildcastClosed);
  await assert.rejects(c.publish("js-x", "X", 1), (e) => e instanceof GuildcastClosed && e.code === 4002);
  assert.equal(c.sessions, 1);
  await c.close();
});

test("presence: the roster is the snapshot, then every join and leave after it", { skip }, async () => {
  const gid = "js-presence";
  const early = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF });
  const watcher = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF, presence: true });
  const late = new GuildcastClient(URL_, { token: TOKEN, backoff: BACKOFF });
  const seen = [];
  watcher.on("presence", (e) => seen.push(e));
  try {
    await early.connect();
    await early.subscribe(gid);
    await watcher.connect();
    assert.equal(watcher.roster(gid), null); // not subscribed yet
    await watcher.subscribe(gid);
    await waitFor(() => watcher.roster(gid) !== null, "the snapshot");
    assert.equal(seen[0].kind, "snapshot");
    assert.deepEqual(seen[0].members.map((m) => m.session), [early.sessionId]);
    const sessions = () => watcher.roster(gid).members.map((m) => m.session).sort();
    // Its own join follows its snapshot.
    await waitFor(() => watcher.roster(gid).count === 2, "the watcher's own join");
    assert.deepEqual(sessions(), [early.sessionId, watcher.sessionId].sort());
    await late.connect();
    await late.subscribe(gid);
    await waitFor(() => watcher.roster(gid).count === 3, "a later join");
    await early.unsubscribe(gid);
    await waitFor(() => watcher.roster(gid).count === 2, "a leave");
    assert.deepEqual(sessions(), [watcher.sessionId, late.sessionId].sort());
    assert.deepEqual(
      seen.map((e) => e.kind),
      ["snapshot", "join", "join", "leave"],
    );
    assert.equal(watcher.roster(gid).truncated, false);
  } finally {
    await Promise.all([early.close(), watcher.close(), late.close()]);
  }
});
