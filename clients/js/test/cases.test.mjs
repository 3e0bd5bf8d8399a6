// The golden protocol cases (tests/protocol/cases.json), read here and by
// tests/protocol/test_cases.py (the Python client session): both clients
// must build the same messages and react to the same server messages the
// same way. No server: the client runs over a scripted WebSocket.
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import {
  GuildcastClient,
  HEARTBEAT,
  IDEMPOTENCY_CONFLICT,
  INVALID_EVENT_NAME,
  PublishError,
  SUBPROTOCOL,
  SubscribeError,
  classifyClose,
  identifyMessage,
  pacedDelay,
  parseReconnectDelay,
  refusedDelay,
  parseRetryHint,
  publishMessage,
  subscribeMessage,
  unsubscribeMessage,
  validEvent,
  validGuild,
  validIdempotencyKey,
} from "../guildcast.js";

const CASES = JSON.parse(readFileSync(new URL("../../../tests/protocol/cases.json", import.meta.url), "utf8"));

const BUILD = {
  heartbeat: () => HEARTBEAT,
  identify: (a) => identifyMessage(a.token, a.guilds, a.events ?? null, a.presence ?? false, a.passive ?? [], a.activity_batch ?? false),
  subscribe: (a) => subscribeMessage(a.guilds, a.passive ?? []),
  unsubscribe: (a) => unsubscribeMessage(a.guilds),
  publish: (a) => publishMessage(a.guild, a.t, a.d, a.nonce ?? null, a.idempotency_key ?? null),
};

for (const c of CASES.messages) {
  test(`message ${c.build}: exact JSON`, () => {
    assert.equal(BUILD[c.build](c.args), c.json);
  });
}

test("close codes are classified as the cases say", () => {
  for (const [code, action] of Object.entries(CASES.close_codes)) assert.equal(classifyClose(Number(code)), action, code);
});

test("protocol 1.1: subprotocol and ERROR codes as the cases say", () => {
  assert.equal(SUBPROTOCOL, CASES.subprotocol);
  assert.deepEqual(
    { invalid_event_name: INVALID_EVENT_NAME, invalid_idempotency_key: INVALID_EVENT_NAME, idempotency_conflict: IDEMPOTENCY_CONFLICT },
    CASES.error_codes,
  );
});

test("guild id and event name grammar", () => {
  const g = CASES.grammar;
  for (const x of g.valid_guilds) assert.ok(validGuild(x), x);
  for (const x of g.invalid_guilds) assert.ok(!validGuild(x), String(x));
  for (const x of g.valid_events) assert.ok(validEvent(x), x);
  for (const x of g.invalid_events) assert.ok(!validEvent(x), String(x));
  for (const x of g.valid_idempotency_keys) assert.ok(validIdempotencyKey(x), x);
  for (const x of g.invalid_idempotency_keys) assert.ok(!validIdempotencyKey(x), String(x));
});

/** A WebSocket the test drives: it records what the client sends. */
class ScriptedSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 1;
    this.sent = [];
    ScriptedSocket.all.push(this);
  }
  send(text) {
    this.sent.push(text);
  }
  close(code = 1000, reason = "") {
    this.serverClose(code, reason);
  }
  receive(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }
  serverClose(code, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

// Lets the client's promises and zero-delay timers run.
const settle = async () => {
  for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 0));
};

for (const sc of CASES.sessions) {
  test(`session: ${sc.name}`, async () => {
    ScriptedSocket.all = [];
    const c = new GuildcastClient("ws://cases.invalid/gateway", { token: "tok", guilds: sc.guilds, rewind: sc.rewind ?? null, presence: sc.presence ?? false, activityBatch: sc.activity_batch ?? false, WebSocket: ScriptedSocket, backoff: { base: 0, cap: 0, random: () => 0 } });
    let items = [];
    let stops = [];
    let waits = [];
    c.on("disconnect", (e) => waits.push(e.wait));
    c.on("event", (e) => items.push({ kind: "event", guild: e.guild, name: e.name, s: e.s, data: e.data }));
    c.on("resync", (e) => items.push({ kind: "resync", guild: e.guild, epoch: e.epoch, s: e.s }));
    c.on("ready", (e) => items.push({ kind: "ready", session_id: e.sessionId, user: e.user }));
    c.on("subscriptionlost", (e) => items.push({ kind: "subscription_lost", guild: e.guild, code: e.code }));
    c.on("subscriberetry", (e) => items.push({ kind: "subscribe_deferred", guild: e.guild, code: e.code, delay_ms: Math.round(e.delay * 1000) }));
    c.on("activity", (e) => items.push({ kind: "activity", guild: e.guild, epoch: e.epoch, s: e.s }));
    c.on("presence", (e) =>
      items.push(
        e.kind === "snapshot"
          ? { kind: "presence_snapshot", guild: e.guild, sessions: e.members.map((m) => m.session), count: e.count, truncated: e.truncated }
          : { kind: `presence_${e.kind}`, guild: e.guild, user: e.member.user, session: e.member.session },
      ),
    );
    c.on("disconnect", () => stops.push(true));
    c.on("closed", () => stops.push(false));
    c.connect().catch(() => {});
    let ws = null;
    let seen = 0; // messages of ws already compared
    let nonce = 0;
    try {
      for (const [i, step] of sc.steps.entries()) {
        const where = `step ${i}: ${JSON.stringify(step)}`;
        items = [];
        stops = [];
        waits = [];
        if (step.open) {
          await settle();
          assert.ok(ScriptedSocket.all.length > 0, where);
          ws = ScriptedSocket.all.shift();
          assert.deepEqual(ws.protocols, [CASES.subprotocol], where); // protocol 1.1
          seen = 0;
        } else if (step.recv) {
          ws.receive(step.recv);
        } else if (step.activate || step.deactivate) {
          const gid = step.activate || step.deactivate;
          (step.activate ? c.activate(gid) : c.deactivate(gid)).then((p) => items.push({ kind: "subscribed", guild: gid, epoch: p.epoch, s: p.s }));
        } else if (step.subscribe) {
          c.subscribe(step.subscribe, null, { rewind: step.rewind ?? null, passive: step.passive ?? false }).then(
            (p) => items.push({ kind: "subscribed", guild: step.subscribe, epoch: p.epoch, s: p.s }),
            (e) => e instanceof SubscribeError && e.code !== 0 && items.push({ kind: "subscribe_refused", guild: e.guild, code: e.code }),
          );
        } else if (step.unsubscribe) {
          c.unsubscribe(step.unsubscribe).then(() => items.push({ kind: "unsubscribed", guild: step.unsubscribe }));
        } else if ("sleep" in step) {
          await new Promise((r) => setTimeout(r, step.sleep * 1000));
        } else if (step.publish) {
          const n = String(++nonce);
          const p = step.publish;
          c.publish(p.guild, p.t, p.d, { idempotencyKey: p.idempotency_key ?? null }).then(
            (s) => items.push({ kind: "acked", nonce: n, s }),
            (e) => e instanceof PublishError && items.push({ kind: "publish_refused", nonce: n, code: e.code }),
          );
        } else {
          ws.serverClose(step.close, step.reason ?? "");
        }
        await settle();
        const sent = ws.sent.slice(seen);
        seen = ws.sent.length;
        if ("sent" in step) assert.deepEqual(sent, step.sent, where);
        if ("items" in step) assert.deepEqual(items, step.items, where);
        if ("reconnects" in step) assert.deepEqual(stops, [step.reconnects], where);
        if ("wait_ms" in step) assert.deepEqual(waits, [step.wait_ms], where);
        if ("positions" in step) assert.deepEqual(c.positions, step.positions, where);
        if ("duplicates" in step) assert.equal(c.duplicatesDropped, step.duplicates, where);
        if ("unread" in step) assert.deepEqual(Object.fromEntries(Object.keys(step.unread).map((g) => [g, c.unread(g)])), step.unread, where);
        if ("rosters" in step) {
          const rosters = Object.fromEntries(Object.entries(c.rosters).map(([g, r]) => [g, { sessions: r.members.map((m) => m.session), count: r.count, truncated: r.truncated }]));
          assert.deepEqual(rosters, step.rosters, where);
        }
      }
    } finally {
      await c.close();
    }
  });
}

test("pacing: retry hints, RECONNECT delays, paced and refused-connect delays as the cases say", () => {
  const p = CASES.pacing;
  for (const c of p.retry_hints) assert.deepEqual(parseRetryHint(c.reason), c.wait_ms, c.reason);
  for (const c of p.reconnect_delays) assert.deepEqual(parseReconnectDelay(c.d), c.wait_ms, JSON.stringify(c.d));
  for (const c of p.paced_delays) assert.ok(Math.abs(pacedDelay(c.backoff, c.wait_ms, c.u) - c.delay) < 1e-9, JSON.stringify(c));
  for (const c of p.refused_delays) {
    const got = refusedDelay(c.restart_ms, c.refused_for, c.u, c.cap);
    if (c.delay === null) assert.equal(got, null, JSON.stringify(c));
    else assert.ok(Math.abs(got - c.delay) < 1e-9, JSON.stringify(c));
  }
});
