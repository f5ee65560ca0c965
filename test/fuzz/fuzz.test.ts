/**
 * Short run of the host protocol fuzzer (the full run is `npm run fuzz`).
 * The seed is printed; set FUZZ_SEED to replay one.
 */

import assert from "node:assert/strict";
import { randomInt } from "node:crypto";
import { describe, it } from "node:test";
import { fixtureSeeds, prng, runFuzz } from "./agent-fuzzer.js";

describe("protocol fuzz (short)", () => {
  it("the fuzzer is seeded from the golden fixtures and replays a seed exactly", () => {
    assert.ok(fixtureSeeds().length >= 20, "fixtures not found");
    const a = prng(42);
    const b = prng(42);
    for (let i = 0; i < 100; i++) assert.equal(a(), b());
  });

  it("20 000 random and mutated inputs: no crash, hang or unbounded growth", { timeout: 300_000 }, async (t) => {
    const seed = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : randomInt(0, 2 ** 32 - 1);
    t.diagnostic(`fuzz seed ${seed} (replay with FUZZ_SEED=${seed})`);
    const r = await runFuzz({ seed, inputs: 20_000, timeBudgetMs: 240_000, heapBoundBytes: 32 << 20 });
    assert.deepEqual(r.failures, [], `seed ${seed}`);
    assert.equal(r.stoppedByTime, false, `seed ${seed}: 20 000 inputs did not finish in the time budget`);
    assert.equal(r.inputs, 20_000);
    assert.ok(r.codecInputs > 1000 && r.connectionInputs > 1000, "both targets were exercised");
    assert.ok(r.protocolErrors > 0, "mutations reached the connection's checks");
  });
});
