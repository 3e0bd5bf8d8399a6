// guildcast.js: the Guildcast gateway client for browsers and Node (>= 20 with
// a global WebSocket: Node 22+, or Node 20 with --experimental-websocket).
// Dependency-free ES module; protocol: PROTOCOL.md.
//
// What it owns: one WebSocket at a time, IDENTIFY, heartbeats on the
// announced interval, SUBSCRIBE/UNSUBSCRIBE, PUBLISH with nonce-matched ACKs,
// and reconnecting with capped exponential backoff and full jitter whenever a
// close code says "reconnect" (everything except "fix the client" and "get a
// new token").
//
// Consistency model: for each followed guild the client keeps the Position
// ({epoch, s}) of the last event it dispatched. Every reconnect's IDENTIFY
// carries those positions and the server replays what was missed. Listeners
// see each guild's events in increasing s with no duplicates (s <= last seen
// is dropped as a safety net). When the server cannot recover a guild
// (recovered: false after a Position was sent) a "resync" event comes before
// that guild's next event: reload that guild's state. A rewind (protocol 1.1,
// PROTOCOL.md "Rewind": a guild's last N events first) becomes a Position at
// its SUBSCRIBED ({epoch, s: head - rewound}), so a reconnect recovers from
// the last event dispatched and never rewinds twice.
//
// Passive guilds (subscribe(gid, null, {passive: true}), PROTOCOL.md "Passive
// subscriptions") dispatch no events, only "activity" (the guild's head, at
// most once per the server's passive_interval); unread(gid) counts the events
// after the guild's Position, and activate(gid) switches it to active on the
// live connection: the events missed while passive are replayed, then live.
//
// Events (an EventTarget; `client.on(type, fn)` passes event.detail to fn):
//   "event"            {guild, name, s, data}
//   "resync"           {guild, epoch, s}
//   "activity"         {guild, epoch, s}       (a passive guild's head moved)
//   "subscriptionlost" {guild, code, message}  (re-subscribe refused)
//   "subscriberetry"   {guild, code, message, delay}  (ERROR 1013: asked again
//                      after delay s, on the backoff's schedule; see subscribe())
//   "presence"         {guild, kind: "snapshot", members, count, truncated} or
//                      {guild, kind: "join" | "leave", member}  (with options.presence)
//   "ready"            {sessionId, user}
//   "disconnect"       {code, reason, delay, wait}   (a reconnect follows after delay s;
//                      wait: the server's hint [minMs, maxMs] or null)
//   "closed"           {code, reason, error}   (stopped for good; error null if by close())
// Listeners run synchronously in arrival order; there is no queue to bound.
//
// Presence (options.presence, PROTOCOL.md "Presence"): each guild's members
// are kept per connection, client.roster(gid) -> {guild, members, count,
// truncated} or null: the PRESENCE_SNAPSHOT after SUBSCRIBED replaces it,
// each PRESENCE_JOIN/LEAVE after it applies (the server misses none and
// doubles none); null again after a disconnect until the next snapshot.

// The protocol's pure parts (message builders, grammar, close-code
// classification) are exported below and checked against the same golden
// cases as the Python client session (tests/protocol/cases.json).

/** Close codes meaning "fix the client" (PROTOCOL.md "Close codes", plus RFC 6455's). */
export const FATAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1008, 1009, 1010, 4001, 4002, 4003, 4005]);
/** "get a new token": fatal unless a tokenProvider can supply a fresh one. */
export const AUTH_FAILED = 4004;
// "back off, reconnect" (1013 server full, 4008 rate limited): the next delay
// starts at least from this attempt's window so a refused crowd spreads out.
const BACKOFF_CODES = new Set([1013, 4008]);
const BACKOFF_FLOOR = 2;
// ERROR 1013 answering a SUBSCRIBE: try that guild again later (PROTOCOL.md "Refusals").
const TRY_AGAIN_LATER = 1013;

/** The client's reaction to a close code: "fatal", "auth", "backoff" or "retry". */
export function classifyClose(code) {
  if (code === AUTH_FAILED) return "auth";
  if (FATAL_CLOSE_CODES.has(code)) return "fatal";
  if (BACKOFF_CODES.has(code)) return "backoff";
  return "retry";
}
const ABNORMAL_CLOSURE = 1006;
// A connection silent for this many heartbeat intervals (and at least
// ZOMBIE_MIN_MS) is considered dead (half-open TCP) and replaced.
const ZOMBIE_INTERVALS = 3;
const ZOMBIE_MIN_MS = 5000;
// The server's default max_frame: a larger message would be closed with the
// fatal 1009, so the client refuses to send it.
const DEFAULT_MAX_MESSAGE = 64 * 1024;
/** PROTOCOL.md "Connecting" (protocol 1.1): the WebSocket subprotocol the client offers. */
export const SUBPROTOCOL = "guildcast.v1";
/** ERROR code of a PUBLISH whose event name is outside the grammar (protocol 1.1). */
export const INVALID_EVENT_NAME = 4422;
const GUILD_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
// Upper case only: names are case-sensitive and have one spelling each (PROTOCOL.md "Messages").
const EVENT_RE = /^[A-Z0-9_]{1,64}$/;
/** The notice a passive subscription gets instead of events (a reserved name). */
export const ACTIVITY_EVENT = "GUILD_ACTIVITY";
const PRESENCE_EVENTS = new Set(["PRESENCE_JOIN", "PRESENCE_LEAVE", "PRESENCE_SNAPSHOT"]);
// Every dispatch name the server sends itself (PROTOCOL.md "Publishing").
const RESERVED_EVENTS = new Set(["READY", "SUBSCRIBED", "UNSUBSCRIBED", ACTIVITY_EVENT, ...PRESENCE_EVENTS]);
const IDEMPOTENCY_KEY_RE = /^[!-~]{1,128}$/;
/** ERROR code of a PUBLISH whose idempotency key was used by an event of other content (protocol 1.1). */
export const IDEMPOTENCY_CONFLICT = 4409;
/** The HEARTBEAT message (op 1). */
export const HEARTBEAT = '{"op":1,"d":null}';
const OP = { DISPATCH: 0, HEARTBEAT: 1, IDENTIFY: 2, SUBSCRIBE: 3, UNSUBSCRIBE: 4, PUBLISH: 5, RECONNECT: 7, HELLO: 10, HEARTBEAT_ACK: 11, ACK: 12, ERROR: 13 };

/** PROTOCOL.md "Messages": guild ids are 1-128 characters of A-Z a-z 0-9 _ . : - */
export function validGuild(gid) {
  return typeof gid === "string" && GUILD_RE.test(gid);
}

/** PROTOCOL.md "Idempotent publish" (1.1): 1-128 visible ASCII characters (! to ~, no space). */
export function validIdempotencyKey(key) {
  return typeof key === "string" && IDEMPOTENCY_KEY_RE.test(key);
}

/** Event names are 1-64 characters of A-Z 0-9 _ (upper case) */
export function validEvent(t) {
  return typeof t === "string" && EVENT_RE.test(t);
}

/**
 * A guild's value in IDENTIFY/SUBSCRIBE: its Position ({epoch, s}), {rewind: n}
 * (1.1) or null; passive (1.1): {"passive": true} with the Position if there is
 * one. A passive request carries no rewind (the server refuses the pair: a
 * passive subscriber receives no events); a pending rewind is sent when active.
 */
export function requestJson(start, passive = false) {
  const pos = start === null || start === undefined || isRewind(start) ? null : { epoch: start.epoch, s: start.s };
  if (passive) return { ...(pos ?? {}), passive: true };
  return isRewind(start) ? { rewind: start.rewind } : pos;
}

function requests(guilds, passive) {
  const out = {};
  for (const [gid, start] of Object.entries(guilds)) out[gid] = requestJson(start, passive.has(gid));
  return out;
}

/**
 * IDENTIFY (op 2); guilds maps guild id -> Position ({epoch, s}), {rewind: n}
 * (1.1) or null; presence asks for presence; those in `passive` subscribe passively;
 * (1.1) activityBatch asks for a notice interval's heads in one GUILD_ACTIVITY of several guilds.
 */
export function identifyMessage(token, guilds, events = null, presence = false, passive = new Set(), activityBatch = false) {
  const d = { token, guilds: requests(guilds, new Set(passive)) };
  if (events !== null && events !== undefined) d.events = events;
  if (presence) d.presence = true;
  if (activityBatch) d.activity_batch = true;
  return JSON.stringify({ op: OP.IDENTIFY, d });
}

/** SUBSCRIBE (op 3); the guilds in `passive` subscribe passively. */
export function subscribeMessage(guilds, passive = new Set()) {
  return JSON.stringify({ op: OP.SUBSCRIBE, d: { guilds: requests(guilds, new Set(passive)) } });
}

/** UNSUBSCRIBE (op 4). */
export function unsubscribeMessage(guilds) {
  return JSON.stringify({ op: OP.UNSUBSCRIBE, d: { guilds } });
}

/** PUBLISH (op 5); the nonce and the idempotency key (protocol 1.1) are left out when null. */
export function publishMessage(guild, t, d, nonce = null, idempotencyKey = null) {
  const body = { guild, t, d };
  if (nonce !== null && nonce !== undefined) body.nonce = nonce;
  if (idempotencyKey !== null && idempotencyKey !== undefined) body.idempotency_key = idempotencyKey;
  return JSON.stringify({ op: OP.PUBLISH, d: body });
}

/** A guild's rewind request ({rewind: n}, protocol 1.1), as kept and sent. */
function isRewind(p) {
  return p !== null && typeof p === "object" && "rewind" in p;
}

function checkRewind(n) {
  if (!Number.isInteger(n) || n < 1) throw new TypeError(`rewind must be a positive integer, not ${JSON.stringify(n)}`);
  return { rewind: n };
}

// Pacing hints (PROTOCOL.md "Pacing: retry hints and staggered RECONNECT"):
// a delay range [min, max] in ms, from a 1013's reason or a RECONNECT's d.
// A hint never names more than this (ms).
export const MAX_HINT_MS = 60000;
const clampHint = (lo, hi) => {
  lo = Math.max(0, Math.min(lo, MAX_HINT_MS));
  return [lo, Math.max(lo, Math.min(hi, MAX_HINT_MS))];
};

/** The [minMs, maxMs] retry hint of a close reason ("...; retry in MIN-MAX ms"), or null. */
export function parseRetryHint(reason) {
  const m = /retry in (\d{1,9})-(\d{1,9}) ms/.exec(reason ?? "");
  return m ? clampHint(Number(m[1]), Number(m[2])) : null;
}

/** The [minMs, maxMs] of a RECONNECT's d ({min_delay_ms, max_delay_ms}), or null. */
export function parseReconnectDelay(d) {
  if (d === null || typeof d !== "object" || !Number.isInteger(d.min_delay_ms) || !Number.isInteger(d.max_delay_ms)) return null;
  return clampHint(d.min_delay_ms, d.max_delay_ms);
}

/** The wait (s): the backoff's delay, or a draw (u in [0, 1)) from the hint when longer. */
export function pacedDelay(backoff, waitMs, u) {
  if (waitMs === null) return backoff;
  return Math.max(backoff, (waitMs[0] + u * (waitMs[1] - waitMs[0])) / 1000);
}

// A connect refused (nothing listening: the node is restarting) costs the
// server nothing (PROTOCOL.md "Pacing"): tried again uniformly within
// REFUSED_WINDOW s, not growing; after a RECONNECT that named a delay range,
// exactly the range's width later (at least REFUSED_MIN_PERIOD s), so the
// crowd keeps its spread from the moment the node listens again; for at most
// REFUSED_FOR s of refusals in a row, then the usual backoff.
export const REFUSED_WINDOW = 1.0;
export const REFUSED_MIN_PERIOD = 0.25;
export const REFUSED_FOR = 30.0;

/** The wait (s) after a refused connect, or null for the usual backoff
 * (refusedFor: s since the first refusal in a row; restartMs: the last
 * RECONNECT's range or null; u in [0, 1); cap: the backoff's, which bounds
 * the window too). */
export function refusedDelay(restartMs, refusedFor, u, cap = REFUSED_WINDOW) {
  if (refusedFor > REFUSED_FOR) return null;
  if (restartMs !== null) return Math.max(REFUSED_MIN_PERIOD, (restartMs[1] - restartMs[0]) / 1000);
  return u * Math.min(REFUSED_WINDOW, cap);
}

// Exponent ceiling: keeps the arithmetic finite after any number of attempts.
const MAX_EXPONENT = 32;

/** Upper bound of retry `attempt`'s delay (seconds): min(cap, base * 2**attempt). */
export function backoffWindow(attempt, base, cap) {
  return Math.min(cap, base * 2 ** Math.min(attempt, MAX_EXPONENT));
}

/** Full jitter: uniform in [0, backoffWindow(attempt, base, cap)]. */
export function fullJitter(attempt, base, cap, random = Math.random) {
  if (attempt < 0 || base < 0 || cap < 0) throw new RangeError("attempt, base and cap must be >= 0");
  return random() * backoffWindow(attempt, base, cap);
}

/**
 * A reconnect schedule (seconds): exponential growth, full jitter, optional
 * limits. nextDelay() after each failure returns the wait, or null when the
 * limits are exhausted; reset() after a success. random and clock are
 * injectable so the schedule is testable.
 */
export class Backoff {
  constructor({ base = 0.5, cap = 30, maxAttempts = null, maxElapsed = null, random = Math.random, clock = () => performance.now() / 1000 } = {}) {
    if (base < 0 || cap < 0) throw new RangeError("base and cap must be >= 0");
    Object.assign(this, { base, cap, maxAttempts, maxElapsed, random, clock });
    this.attempt = 0; // delays that grew the window (the next one's exponent)
    this.handed = 0; // every delay handed out (what maxAttempts bounds)
    this._started = null;
  }

  // fixed: a delay decided elsewhere (a refused connect): handed out as is,
  // within the limits, without growing the next window.
  nextDelay(floor = 0, fixed = null) {
    const now = this.clock();
    if (this._started === null) this._started = now;
    if (this.maxAttempts !== null && this.handed >= this.maxAttempts) return null;
    if (this.maxElapsed !== null && now - this._started >= this.maxElapsed) return null;
    this.handed += 1;
    let delay;
    if (fixed !== null) {
      delay = Math.max(0, fixed);
    } else {
      delay = fullJitter(Math.max(this.attempt, floor), this.base, this.cap, this.random);
      this.attempt += 1;
    }
    if (this.maxElapsed !== null) delay = Math.min(delay, Math.max(0, this._started + this.maxElapsed - now));
    return delay;
  }

  reset() {
    this.attempt = 0;
    this.handed = 0;
    this._started = null;
  }
}

export class GuildcastError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The client stopped for good; `code` says why. */
export class GuildcastClosed extends GuildcastError {
  constructor(code, reason) {
    super(`guildcast connection closed for good: ${code} ${reason ?? ""}`.trim());
    this.code = code;
    this.reason = reason ?? "";
  }
}

/** Close 4004: the token was refused (and no tokenProvider gave an accepted one). */
export class AuthenticationFailed extends GuildcastClosed {}
/** The backoff limits were reached; `code` is the last failure's close code. */
export class ReconnectFailed extends GuildcastClosed {}
/** The application called close(). */
export class ClientClosed extends GuildcastClosed {
  constructor() {
    super(1000, "client closed");
  }
}

/** The server answered a command with ERROR `code` (PROTOCOL.md op 13). */
export class CommandError extends GuildcastError {
  constructor(code, message, guild = null) {
    super(`${code} ${message}${guild ? ` (guild ${guild})` : ""}`);
    this.code = code;
    this.serverMessage = message;
    this.guild = guild;
  }
}
export class PublishError extends CommandError {}
export class SubscribeError extends CommandError {}
/** The connection closed before the ACK: the event may or may not have been sequenced. */
export class PublishInterrupted extends GuildcastError {}

function checkGuild(gid) {
  if (!validGuild(gid)) throw new TypeError(`invalid guild id ${JSON.stringify(gid)}`);
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {}); // rejections are handed to whoever awaits it
  return { promise, resolve, reject };
}

/**
 * A Guildcast client. `await client.connect()` resolves at the first READY
 * (retrying per the backoff) or rejects with GuildcastClosed.
 *
 * Options: token or tokenProvider (sync or async, called before every
 * attempt; with it one 4004 is retried with a fresh token), guilds (array to
 * follow from the first IDENTIFY), rewind (protocol 1.1: those guilds start
 * with their last `rewind` events instead of from now), events (event-name
 * filter), presence (true: ask for presence, see roster() and the "presence"
 * event), activityBatch (protocol 1.1: a notice interval's heads of all
 * passive guilds in one message, still one "activity" event per guild; a
 * server that does not know it sends one notice per guild), backoff (a
 * Backoff or its options), WebSocket (constructor;
 * default the global), maxMessage (bytes), openTimeout and closeTimeout (ms).
 */
export class GuildcastClient extends EventTarget {
  constructor(url, options = {}) {
    super();
    const { token = null, tokenProvider = null, guilds = [], rewind = null, events = null, presence = false, activityBatch = false, backoff = null, WebSocket: WS = globalThis.WebSocket, maxMessage = DEFAULT_MAX_MESSAGE, openTimeout = 10000, closeTimeout = 5000 } = options;
    if (token === null && tokenProvider === null) throw new TypeError("give a token or a tokenProvider");
    if (typeof WS !== "function") throw new TypeError("no WebSocket: pass options.WebSocket (Node 20: run with --experimental-websocket)");
    this.url = url;
    this._token = token;
    this._tokenProvider = tokenProvider;
    this._eventFilter = events === null ? null : [...events];
    this._presence = Boolean(presence);
    this._batchNotices = Boolean(activityBatch);
    /** guild -> {members: Map(session -> member), count, truncated}, on this connection. */
    this._rosters = new Map();
    this._backoff = backoff instanceof Backoff ? backoff : new Backoff(backoff ?? {});
    // What the reconnect loop did (PROTOCOL.md "Pacing"), and the delay
    // range of the last RECONNECT (its 1001 follows).
    this.counters = { reconnect_requests: 0, try_again_later: 0, hinted_waits: 0, reconnects: 0, gave_up: 0, subscribe_retries: 0, refused_connects: 0 };
    this._reconnectHint = null;
    // The range of the RECONNECT that ended the last connection, kept for the
    // refused connects after it, and when the refusals in a row began.
    this._restartHint = null;
    this._refusedSince = null;
    this._WS = WS;
    this._maxMessage = maxMessage;
    this._openTimeout = openTimeout;
    this._closeTimeout = closeTimeout;
    /** guild -> last seen Position ({epoch, s}), or null or {rewind: n} before
     * its first SUBSCRIBED: the source of every IDENTIFY. */
    this._desired = new Map();
    const start = rewind === null ? null : checkRewind(rewind);
    for (const gid of guilds) {
      checkGuild(gid);
      this._desired.set(gid, start);
    }
    this._passive = new Set(); // followed guilds subscribed passively
    this._heads = new Map(); // passive guild -> last head heard of ({epoch, s})
    this._subscribed = new Set(); // SUBSCRIBED on the current connection
    this._sent = new Map(); // requested on the current connection -> Position sent
    // SUBSCRIBE retries after ERROR 1013: each followed guild's refusals in a
    // row (forgotten at its SUBSCRIBED or when left), and the timer of each
    // guild waiting to be asked again on the current connection.
    this._refusals = new Map();
    this._retryTimers = new Map();
    this._subWaiters = new Map();
    this._unsubWaiters = new Map();
    this._publishes = new Map(); // nonce -> deferred
    this._nonce = 0;
    this._ws = null;
    this._identified = false;
    this._readyWaiters = new Set();
    this._failure = null;
    this._closing = false;
    this._started = false;
    this._firstReady = deferred();
    this._stopped = false;
    this._heartbeatTimer = null;
    this._runner = null;
    this._sleepTimer = null;
    this._sleepWake = null;
    this._authFailures = 0;
    this._heartbeatPausedUntil = 0;
    /** Session id and user of the current connection. */
    this.sessionId = null;
    this.user = null;
    /** Connections that reached READY, the first included. */
    this.sessions = 0;
    /** Events dropped because their s was already seen (safety net). */
    this.duplicatesDropped = 0;
  }

  /** addEventListener(type, e => fn(e.detail)); returns a function that removes it. */
  on(type, fn) {
    const listener = (e) => fn(e.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /** True while the current connection is READY. */
  get connected() {
    return this._identified;
  }

  /** The subprotocol the current connection agreed ("guildcast.v1"), or null. */
  get subprotocol() {
    return this._ws && this._ws.protocol ? this._ws.protocol : null;
  }

  /** A copy of each followed guild's last seen Position (for persisting; null before its first SUBSCRIBED). */
  get positions() {
    return Object.fromEntries([...this._desired].map(([g, p]) => [g, isRewind(p) ? null : p]));
  }

  /** `gid`'s presence on this connection ({guild, members, count, truncated}), or null before its snapshot. */
  roster(gid) {
    const r = this._rosters.get(gid);
    return r ? { guild: gid, members: [...r.members.values()], count: r.count, truncated: r.truncated } : null;
  }

  /** Every guild's roster known on this connection, by guild id. */
  get rosters() {
    return Object.fromEntries([...this._rosters.keys()].map((g) => [g, this.roster(g)]));
  }

  /** Send no HEARTBEAT for `ms`: the server closes with 4009 and the client recovers. For tests. */
  pauseHeartbeats(ms) {
    this._heartbeatPausedUntil = Date.now() + ms;
  }

  connect() {
    if (!this._started) {
      if (this._closing) return Promise.reject(new ClientClosed());
      this._started = true;
      this._runner = this._run();
    }
    return this._firstReady.promise;
  }

  /** Close (1000) and stop. Pending commands reject with ClientClosed. Idempotent. */
  async close() {
    if (!this._closing) {
      this._closing = true;
      if (this._sleepWake) this._sleepWake();
      const ws = this._ws;
      if (ws && ws.readyState <= 1) ws.close(1000, "client closing");
    }
    if (this._runner) {
      // Bounded: a close handshake the server never answers must not hang us.
      let timer;
      const timeout = new Promise((resolve) => (timer = setTimeout(resolve, this._closeTimeout)));
      await Promise.race([this._runner, timeout]);
      clearTimeout(timer);
    }
    this._stop(null);
  }

  /**
   * Follow guild `gid`; resolves with its Position once SUBSCRIBED. With a
   * `position`, the server replays after it (or a "resync" comes first).
   * With `{ rewind: n }` instead (protocol 1.1), the guild's last n events
   * come first (as many as the server's history and max_rewind hold), and
   * it resolves with the Position before them. Rejects with SubscribeError
   * on ERROR (4403: not allowed). An ERROR 1013 (the node cannot take the
   * guild now) is retried instead, after a full-jitter delay on the backoff's
   * schedule (at least any retry hint in its message), as often as it takes
   * ("subscriberetry", counters.subscribe_retries; unsubscribe() stops it). `{passive: true}` subscribes passively
   * ("activity" only; never with a rewind); for a guild already followed in
   * the other mode it switches it (activate(), deactivate()).
   */
  async subscribe(gid, position = null, { rewind = null, passive = false } = {}) {
    checkGuild(gid);
    if (position !== null && rewind !== null) throw new TypeError("give a position or a rewind, not both");
    const start = rewind === null ? position : checkRewind(rewind);
    if (passive && rewind !== null) throw new TypeError("a passive guild takes no rewind (it receives no events)");
    this._requireUsable();
    if (this._desired.has(gid) && this._passive.has(gid) !== passive) return this._switch(gid, passive);
    if (this._subscribed.has(gid)) return this._desired.get(gid);
    let waiter = this._subWaiters.get(gid);
    if (!waiter) {
      waiter = deferred();
      this._subWaiters.set(gid, waiter);
    }
    if (!this._desired.has(gid)) {
      this._desired.set(gid, start);
      if (passive) this._passive.add(gid);
    }
    if (this._ws && this._identified && !this._sent.has(gid) && !this._retryTimers.has(gid)) {
      const pos = this._desired.get(gid);
      this._sent.set(gid, pos);
      this._send(subscribeMessage({ [gid]: pos }, this._passive));
    }
    return waiter.promise;
  }

  /** Switch passive guild `gid` to active: the events missed while passive are replayed, then live ones. */
  activate(gid) {
    return this._switch(gid, false);
  }

  /** Switch followed guild `gid` to passive (its Position is kept for activate()). */
  deactivate(gid) {
    return this._switch(gid, true);
  }

  /** True if `gid` is followed passively. */
  isPassive(gid) {
    return this._passive.has(gid);
  }

  /** Events of passive guild `gid` after its Position by the last "activity" (0 when active; null when unknown). */
  unread(gid) {
    if (!this._desired.has(gid)) return null;
    if (!this._passive.has(gid)) return 0;
    const head = this._heads.get(gid);
    const pos = this._desired.get(gid);
    if (!head || !pos || isRewind(pos) || head.epoch !== pos.epoch) return null;
    return Math.max(0, head.s - pos.s);
  }

  async _switch(gid, passive) {
    checkGuild(gid);
    this._requireUsable();
    if (!this._desired.has(gid)) throw new TypeError(`guild ${gid} is not followed: subscribe first`);
    if (this._passive.has(gid) === passive && this._subscribed.has(gid) && !this._subWaiters.has(gid)) {
      return this._desired.get(gid);
    }
    let waiter = this._subWaiters.get(gid);
    if (!waiter) {
      waiter = deferred();
      this._subWaiters.set(gid, waiter);
    }
    if (this._passive.has(gid) !== passive) {
      if (passive) this._passive.add(gid);
      else {
        this._passive.delete(gid);
        this._heads.delete(gid);
      }
      if (this._ws && this._identified && this._sent.has(gid)) {
        const pos = this._desired.get(gid);
        this._sent.set(gid, pos);
        this._send(subscribeMessage({ [gid]: pos }, this._passive));
      }
    }
    return waiter.promise;
  }

  /** Stop following `gid`; no event of it is dispatched after this resolves. */
  async unsubscribe(gid) {
    checkGuild(gid);
    this._requireUsable();
    if (!this._desired.has(gid)) return;
    this._desired.delete(gid);
    this._passive.delete(gid);
    this._heads.delete(gid);
    this._subscribed.delete(gid);
    this._rosters.delete(gid);
    this._refusals.delete(gid);
    clearTimeout(this._retryTimers.get(gid));
    this._retryTimers.delete(gid);
    const waiter = this._subWaiters.get(gid);
    if (waiter) {
      this._subWaiters.delete(gid);
      waiter.reject(new SubscribeError(0, "unsubscribed before SUBSCRIBED", gid));
    }
    if (!this._ws || !this._identified || !this._sent.has(gid)) return;
    this._sent.delete(gid);
    let done = this._unsubWaiters.get(gid);
    if (!done) {
      done = deferred();
      this._unsubWaiters.set(gid, done);
    }
    this._send(unsubscribeMessage([gid]));
    return done.promise;
  }

  /**
   * Publish event `t` with data `d` to `gid`; resolves with its s (the ACK).
   * Waits for a connection if there is none. Rejects with PublishError when
   * refused (4403, 4413, 4429, 1013), PublishInterrupted when the connection
   * closes before the ACK, GuildcastClosed if the client stops.
   *
   * `options.idempotencyKey` (protocol 1.1): a publish whose outcome is
   * unknown (ERROR 4504, PublishInterrupted) is safe to retry with the same
   * key: within the server's window the retry resolves with the original s
   * and subscribers see the event once. The same key with other t/d is
   * refused with 4409 (IDEMPOTENCY_CONFLICT).
   */
  async publish(gid, t, d = null, { idempotencyKey = null } = {}) {
    checkGuild(gid);
    if (!validEvent(t)) throw new TypeError(`invalid event name ${JSON.stringify(t)}`);
    if (RESERVED_EVENTS.has(t)) throw new TypeError(`${t} is a reserved event name`);
    if (idempotencyKey !== null && !validIdempotencyKey(idempotencyKey)) {
      throw new TypeError(`invalid idempotency key ${JSON.stringify(idempotencyKey)}`);
    }
    const ws = await this._waitReady();
    const nonce = String(++this._nonce);
    const body = publishMessage(gid, t, d, nonce, idempotencyKey);
    if (new TextEncoder().encode(body).length > this._maxMessage) throw new RangeError(`message exceeds ${this._maxMessage} bytes`);
    const waiter = deferred();
    this._publishes.set(nonce, waiter);
    try {
      ws.send(body);
      return await waiter.promise;
    } finally {
      this._publishes.delete(nonce);
    }
  }

  // --- internals ---------------------------------------------------------------

  _emit(type, detail) {
    try {
      this.dispatchEvent(new CustomEvent(type, { detail }));
    } catch (err) {
      console.error("guildcast listener failed", err);
    }
  }

  _requireUsable() {
    if (this._failure) throw this._failure;
    if (this._closing) throw new ClientClosed();
    if (!this._started) throw new GuildcastError("client not connected: call connect() first");
  }

  _waitReady() {
    this._requireUsable();
    if (this._ws && this._identified) return Promise.resolve(this._ws);
    return new Promise((resolve, reject) => this._readyWaiters.add({ resolve, reject }));
  }

  _wakeReady() {
    const waiters = [...this._readyWaiters];
    this._readyWaiters.clear();
    for (const w of waiters) {
      if (this._failure) w.reject(this._failure);
      else if (this._closing) w.reject(new ClientClosed());
      else w.resolve(this._ws);
    }
  }

  _send(text) {
    const ws = this._ws;
    if (ws && ws.readyState === 1) ws.send(text);
  }

  _stop(failure) {
    if (failure && !this._failure) this._failure = failure;
    const err = this._failure ?? new ClientClosed();
    const first = !this._stopped;
    this._stopped = true;
    clearInterval(this._heartbeatTimer);
    this._clearRetries();
    this._firstReady.reject(err);
    for (const w of this._publishes.values()) w.reject(err);
    for (const w of this._subWaiters.values()) w.reject(err);
    this._subWaiters.clear();
    for (const w of this._unsubWaiters.values()) w.resolve();
    this._unsubWaiters.clear();
    this._wakeReady();
    if (first) this._emit("closed", { code: err.code, reason: err.reason, error: this._failure });
  }

  _classify(code, reason) {
    const action = classifyClose(code);
    if (action === "auth") {
      this._authFailures += 1;
      if (this._tokenProvider === null || this._authFailures > 1) return new AuthenticationFailed(code, reason);
      return null;
    }
    if (action === "fatal") return new GuildcastClosed(code, reason);
    return null;
  }

  async _run() {
    while (!this._closing) {
      const { code, reason, refused = false, opened = false } = await this._attempt();
      if (this._closing) return;
      const failure = this._classify(code, reason);
      if (failure) return this._stop(failure);
      if (code === 1013) this.counters.try_again_later += 1;
      const hint = code === 1013 ? parseRetryHint(reason) : code === 1001 ? this._reconnectHint : null;
      this._reconnectHint = null;
      if (opened) {
        this._restartHint = null;
        this._refusedSince = null;
      }
      if (code === 1001) this._restartHint = hint;
      let fixed = null;
      if (refused) {
        // Nothing listening (PROTOCOL.md "Pacing"): soon and not growing.
        const now = this._backoff.clock();
        if (this._refusedSince === null) this._refusedSince = now;
        fixed = refusedDelay(this._restartHint, now - this._refusedSince, this._backoff.random(), this._backoff.cap);
      }
      let delay = this._backoff.nextDelay(classifyClose(code) === "backoff" ? BACKOFF_FLOOR : 0, fixed);
      if (delay === null) {
        this.counters.gave_up += 1;
        return this._stop(new ReconnectFailed(code, `gave up reconnecting (${reason})`));
      }
      if (fixed !== null) this.counters.refused_connects += 1;
      if (hint !== null) {
        // The server's pacing hint: never sooner than it allows.
        this.counters.hinted_waits += 1;
        delay = pacedDelay(delay, hint, this._backoff.random());
      }
      this.counters.reconnects += 1;
      this._emit("disconnect", { code, reason, delay, wait: hint });
      await new Promise((resolve) => {
        this._sleepWake = resolve;
        this._sleepTimer = setTimeout(resolve, delay * 1000);
      });
      clearTimeout(this._sleepTimer);
      this._sleepWake = null;
    }
  }

  async _attempt() {
    let token;
    try {
      token = this._tokenProvider ? await this._tokenProvider() : this._token;
      if (typeof token !== "string") throw new TypeError("tokenProvider must return a string");
      this._token = token;
    } catch (err) {
      return { code: ABNORMAL_CLOSURE, reason: `token provider failed: ${err}` };
    }
    if (this._closing) return { code: 1000, reason: "client closing" };
    let ws;
    try {
      ws = new this._WS(this.url, [SUBPROTOCOL]);
    } catch (err) {
      return { code: 4002, reason: `bad gateway URL: ${err}` };
    }
    this._ws = ws;
    return new Promise((resolve) => {
      let lastRecv = Date.now();
      let opened = false;
      // Ends this attempt once: on its close event or, for an opening that
      // failed, on its error. Node 20's WebSocket (undici 6) fires only
      // "error" for a refused or aborted opening, never "close", and stays
      // CONNECTING: waiting for a close event there hangs the client for good
      // (a reconnect landing while a restarting server is down).
      // refused: the opening failed before the WebSocket opened (a browser
      // does not say why; a refused connect is the common cause).
      const finish = (code, reason, refused = false) => {
        clearTimeout(helloTimer);
        clearInterval(this._heartbeatTimer);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        this._ws = null;
        this._identified = false;
        this._subscribed.clear();
        this._sent.clear();
        this._rosters.clear();
        this._clearRetries(); // the next IDENTIFY asks for those guilds
        const interrupted = new PublishInterrupted("connection closed before the ACK");
        for (const w of this._publishes.values()) w.reject(interrupted);
        for (const w of this._unsubWaiters.values()) w.resolve();
        this._unsubWaiters.clear();
        resolve({ code, reason, refused, opened });
      };
      const helloTimer = setTimeout(() => {
        // Ended here: no close event may follow a socket still opening (see
        // finish), and closing one fires its "error" at once.
        finish(4000, "no HELLO in time");
        if (ws.readyState <= 1) ws.close(4000, "no HELLO in time");
      }, this._openTimeout);
      ws.onopen = () => {
        opened = true;
      };
      ws.onmessage = (ev) => {
        lastRecv = Date.now();
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          ws.close(4000, "bad message from server");
          return;
        }
        if (msg.op === OP.HELLO) {
          clearTimeout(helloTimer);
          const interval = msg.d.heartbeat_interval;
          const silentLimit = Math.max(ZOMBIE_INTERVALS * interval, ZOMBIE_MIN_MS);
          this._heartbeatTimer = setInterval(() => {
            if (Date.now() - lastRecv > silentLimit) return ws.close(4000, "server silent");
            if (Date.now() < this._heartbeatPausedUntil) return;
            if (ws.readyState === 1) ws.send(HEARTBEAT);
          }, interval);
          this._sent = new Map(this._desired);
          ws.send(identifyMessage(token, Object.fromEntries(this._sent), this._eventFilter, this._presence, this._passive, this._batchNotices));
          return;
        }
        this._handle(ws, msg);
      };
      ws.onclose = (ev) => {
        const code = ev.code || ABNORMAL_CLOSURE;
        finish(code, ev.reason || "", !opened && code === ABNORMAL_CLOSURE);
      };
      // Once open, a close event always follows an error; before, maybe none.
      ws.onerror = () => {
        if (!opened) finish(ABNORMAL_CLOSURE, "connection failed", true);
      };
    });
  }

  _handle(ws, msg) {
    const { op, d } = msg;
    if (op === OP.DISPATCH) {
      const { t, g } = msg;
      if (t === "READY") this._ready(d);
      else if (t === "SUBSCRIBED" && g != null) this._subscribedGuild(ws, g, d);
      else if (t === ACTIVITY_EVENT && g != null) this._activity(g, d);
      else if (t === ACTIVITY_EVENT && g == null) this._activityBatch(d);
      else if (t === "UNSUBSCRIBED" && g != null) {
        const w = this._unsubWaiters.get(g);
        this._unsubWaiters.delete(g);
        if (w) w.resolve();
      } else if (g != null && Number.isInteger(msg.s)) this._event(g, t, msg.s, d);
      else if (g != null && this._presence && PRESENCE_EVENTS.has(t) && this._desired.has(g)) this._presenceDispatch(g, t, d);
    } else if (op === OP.ACK) {
      const w = this._publishes.get(d.nonce);
      if (w) w.resolve(d.s);
    } else if (op === OP.ERROR) {
      this._error(d);
    } else if (op === OP.RECONNECT) {
      // Its close 1001 follows; the delay range it names paces the reconnect.
      this.counters.reconnect_requests += 1;
      this._reconnectHint = parseReconnectDelay(d);
    }
    // HEARTBEAT_ACK refreshes lastRecv.
  }

  _ready(d) {
    this._identified = true;
    this.sessionId = d.session_id;
    this.user = d.user;
    this.sessions += 1;
    this._authFailures = 0;
    this._backoff.reset();
    // Guilds asked for while IDENTIFY was in flight.
    const missing = {};
    let any = false;
    for (const [gid, pos] of this._desired) {
      if (!this._sent.has(gid)) {
        this._sent.set(gid, pos);
        missing[gid] = pos;
        any = true;
      }
    }
    if (any) this._send(subscribeMessage(missing, this._passive));
    this._firstReady.resolve();
    this._wakeReady();
    this._emit("ready", { sessionId: this.sessionId, user: this.user });
  }

  _subscribedGuild(ws, gid, d) {
    if (!this._desired.has(gid)) return; // unsubscribed meanwhile
    const sent = this._sent.get(gid) ?? null;
    const current = this._desired.get(gid);
    let pos;
    if (d.passive === true) {
      // No replay: the Position stays where activate() resumes; a fresh one
      // (or one of a lost epoch) starts at the head, and a rewind not yet
      // answered becomes the Position that many events back (they count as
      // unread; the activation replays them). No presence changes come while
      // passive: the roster is forgotten until the activation's snapshot.
      this._heads.set(gid, { epoch: d.epoch, s: d.s });
      this._rosters.delete(gid);
      pos = current;
      if (isRewind(current)) {
        pos = { epoch: d.epoch, s: Math.max(0, d.s - current.rewind) };
        this._desired.set(gid, pos);
      } else if (!current || current.epoch !== d.epoch) {
        pos = { epoch: d.epoch, s: d.s };
        this._desired.set(gid, pos);
        if (sent !== null && !isRewind(sent)) this._emit("resync", { guild: gid, epoch: d.epoch, s: d.s });
      }
    } else if (isRewind(sent) && isRewind(current)) {
      // The rewind becomes a Position: the replay head-k+1..head follows.
      const k = d.rewound;
      if (!Number.isInteger(k) || k < 0 || k > d.s) {
        ws.close(4000, "bad message from server");
        return;
      }
      pos = { epoch: d.epoch, s: d.s - k };
      this._desired.set(gid, pos);
    } else if (d.recovered && current && !isRewind(current) && current.epoch === d.epoch) {
      pos = current; // the replay s+1..head follows
    } else {
      pos = { epoch: d.epoch, s: d.s };
      this._desired.set(gid, pos);
      if (sent !== null && !isRewind(sent)) this._emit("resync", { guild: gid, epoch: d.epoch, s: d.s });
    }
    this._subscribed.add(gid);
    this._refusals.delete(gid);
    // A SUBSCRIBED of the mode asked for (a switch may still be answered by one of the mode it left).
    if ((d.passive === true) !== this._passive.has(gid)) return;
    const w = this._subWaiters.get(gid);
    this._subWaiters.delete(gid);
    if (w) w.resolve(pos);
  }

  _activity(gid, d) {
    if (!this._desired.has(gid) || !d || typeof d.epoch !== "string" || !Number.isInteger(d.s)) return;
    const known = this._heads.get(gid);
    if (!known || known.epoch !== d.epoch || d.s > known.s) this._heads.set(gid, { epoch: d.epoch, s: d.s });
    this._emit("activity", { guild: gid, epoch: d.epoch, s: d.s });
  }

  // (1.1) A GUILD_ACTIVITY of several guilds, {gid: s}, read as that many single notices.
  // Each guild's epoch is its passive SUBSCRIBED's (the last head heard of, else the
  // Position): the server closes a guild's passive sessions with 4000 when its epoch changes.
  _activityBatch(d) {
    if (!d || typeof d !== "object" || Array.isArray(d)) return;
    for (const [gid, s] of Object.entries(d)) {
      if (!this._desired.has(gid) || !Number.isInteger(s)) continue;
      const head = this._heads.get(gid);
      const known = head ?? this._desired.get(gid);
      if (!known || typeof known.epoch !== "string") continue; // no epoch yet: the SUBSCRIBED tells the head
      if (!head || s > known.s) this._heads.set(gid, { epoch: known.epoch, s });
      this._emit("activity", { guild: gid, epoch: known.epoch, s });
    }
  }

  _event(gid, t, s, d) {
    if (!this._desired.has(gid)) return;
    const start = this._desired.get(gid);
    const pos = isRewind(start) ? null : start; // a rewind: no SUBSCRIBED yet
    if (pos && s <= pos.s) {
      this.duplicatesDropped += 1;
      return;
    }
    this._desired.set(gid, { epoch: pos ? pos.epoch : "", s });
    this._emit("event", { guild: gid, name: t, s, data: d });
  }

  // PRESENCE_SNAPSHOT replaces the guild's roster; PRESENCE_JOIN/LEAVE apply to it.
  _presenceDispatch(gid, t, d) {
    if (t === "PRESENCE_SNAPSHOT") {
      const members = d.members.map(({ user, session, node }) => ({ user, session, node }));
      this._rosters.set(gid, { members: new Map(members.map((m) => [m.session, m])), count: d.count, truncated: d.truncated });
      this._emit("presence", { guild: gid, kind: "snapshot", members, count: d.count, truncated: d.truncated });
      return;
    }
    const member = { user: d.user, session: d.session, node: d.node };
    const r = this._rosters.get(gid);
    if (t === "PRESENCE_JOIN") {
      if (r && !r.members.has(member.session)) {
        r.members.set(member.session, member);
        r.count += 1;
      }
      this._emit("presence", { guild: gid, kind: "join", member });
      return;
    }
    if (r && (r.members.delete(member.session) || r.truncated)) r.count = Math.max(0, r.count - 1);
    this._emit("presence", { guild: gid, kind: "leave", member });
  }

  _retrySubscribe(gid) {
    this._retryTimers.delete(gid);
    if (!this._ws || !this._identified || !this._desired.has(gid) || this._sent.has(gid)) return;
    const pos = this._desired.get(gid);
    this._sent.set(gid, pos);
    this._send(subscribeMessage({ [gid]: pos }, this._passive));
  }

  _clearRetries() {
    for (const t of this._retryTimers.values()) clearTimeout(t);
    this._retryTimers.clear();
  }

  _error(d) {
    const { code, message, nonce, g } = d;
    if (nonce != null) {
      const w = this._publishes.get(nonce);
      if (w) w.reject(new PublishError(code, message, g ?? null));
      return;
    }
    if (g != null && this._sent.has(g) && !this._subscribed.has(g) && code === TRY_AGAIN_LATER) {
      // "Try again later" (PROTOCOL.md "Refusals"): ask again after a
      // backoff delay, or the hint in the message when it is longer.
      this._sent.delete(g);
      const attempt = this._refusals.get(g) ?? 0;
      this._refusals.set(g, attempt + 1);
      const b = this._backoff;
      const jitter = fullJitter(Math.max(attempt, BACKOFF_FLOOR), b.base, b.cap, b.random);
      const delay = pacedDelay(jitter, parseRetryHint(String(message ?? "")), b.random());
      this.counters.subscribe_retries += 1;
      this._retryTimers.set(g, setTimeout(() => this._retrySubscribe(g), delay * 1000));
      this._emit("subscriberetry", { guild: g, code, message, delay });
      return;
    }
    if (g != null && this._sent.has(g) && !this._subscribed.has(g)) {
      this._desired.delete(g);
      this._sent.delete(g);
      this._rosters.delete(g);
      const w = this._subWaiters.get(g);
      this._subWaiters.delete(g);
      if (w) w.reject(new SubscribeError(code, message, g));
      else this._emit("subscriptionlost", { guild: g, code, message });
      return;
    }
    console.warn(`guildcast: server error ${code} ${message}`);
  }
}
