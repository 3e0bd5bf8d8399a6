// Unit tests of the reconnect schedule (no server needed).
import test from "node:test";
import assert from "node:assert/strict";
import { Backoff, backoffWindow, fullJitter } from "../guildcast.js";

// mulberry32: a tiny seeded PRNG so the statistics below are reproducible.
function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test("full jitter stays within [0, min(cap, base * 2^n)] and its mean grows until the cap", () => {
  const random = seeded(42);
  const base = 0.5;
  const cap = 8;
  let previousMean = 0;
  for (let n = 0; n < 10; n++) {
    const hi = Math.min(cap, base * 2 ** n);
    let sum = 0;
    let max = 0;
    const samples = 2000;
    for (let i = 0; i < samples; i++) {
      const d = fullJitter(n, base, cap, random);
      assert.ok(d >= 0 && d <= hi, `attempt ${n}: ${d} outside [0, ${hi}]`);
      sum += d;
      max = Math.max(max, d);
    }
    const mean = sum / samples;
    // Uniform on [0, hi]: mean hi/2; 2000 samples put it within 10 %.
    assert.ok(Math.abs(mean - hi / 2) < 0.1 * hi, `attempt ${n}: mean ${mean} vs ${hi / 2}`);
    assert.ok(max > 0.9 * hi, "jitter spans its whole window");
    if (base * 2 ** n < cap) assert.ok(mean > previousMean, "the mean grows while under the cap");
    previousMean = mean;
  }
  assert.equal(backoffWindow(100, base, cap), cap);
  assert.throws(() => fullJitter(-1, base, cap), RangeError);
});

test("Backoff honours maxAttempts, maxElapsed, floor and reset", () => {
  const b = new Backoff({ base: 1, cap: 4, maxAttempts: 3, random: () => 1 });
  assert.deepEqual([b.nextDelay(), b.nextDelay(), b.nextDelay(), b.nextDelay()], [1, 2, 4, null]);
  b.reset();
  assert.equal(b.nextDelay(2), 4, "a floor starts from a later window");
  let now = 0;
  const e = new Backoff({ base: 1, cap: 10, maxElapsed: 5, random: () => 1, clock: () => now });
  assert.equal(e.nextDelay(), 1);
  now = 4.5;
  assert.equal(e.nextDelay(), 0.5, "never sleeps past the deadline");
  now = 5;
  assert.equal(e.nextDelay(), null);
});
