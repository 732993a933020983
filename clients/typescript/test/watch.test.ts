/** watchConfigChanges against the real service (plaintext), on either store: events, scope, clean ends, errors. */

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { IntegrationsClient, InvalidArgumentError, type WatchEvent } from "../src/index.js";
import { PK, PLAIN_LOG, PLAIN_TARGET, SK, assertJsonSafe, newOrg, nextEvent, rejection, skipUnless, streamEnded, withTimeout } from "./helpers.js";

const STRIPE = { secretKey: SK, publishableKey: PK };

describe("watchConfigChanges", skipUnless(PLAIN_TARGET && PLAIN_LOG, "ITS_PLAIN_TARGET and ITS_PLAIN_LOG"), () => {
  const client = PLAIN_TARGET ? new IntegrationsClient({ target: PLAIN_TARGET }) : undefined!;
  after(() => client?.close());

  test("started first; a save is a changed event with the etag getConfig then returns; a delete too; no value", async () => {
    const org = newOrg();
    const abort = new AbortController();
    const events = client.watchConfigChanges({ organizationId: org, providers: ["stripe"] }, { signal: abort.signal });
    const stream = events[Symbol.asyncIterator]();
    try {
      const started = await nextEvent(stream);
      assert.equal(started.kind, "started");
      assert.ok(started.kind === "started" && started.time !== null && !Number.isNaN(Date.parse(started.time)));
      assertJsonSafe(started);

      // Out of scope (another organization, another provider), committed before ours: never seen.
      await client.saveIntegration(newOrg(), "stripe", STRIPE);
      await client.saveIntegration(org, "resend", { apiKey: "re_typescript_watch_0001" });
      const saved = await client.saveIntegration(org, "stripe", STRIPE);
      const changed = await nextEvent(stream);
      assertJsonSafe(changed);
      const config = await client.getConfig(org, "stripe");
      assert.deepEqual(changed, {
        kind: "changed",
        organizationId: org,
        provider: "stripe",
        etag: config.etag,
        type: "saved",
        time: config.updateTime,
      });
      assert.equal(saved.etag, config.etag);
      assert.ok(!JSON.stringify(changed).includes(SK) && !JSON.stringify(changed).includes("4242"));

      await client.deleteIntegration(org, "stripe", { etag: config.etag });
      const deleted = await nextEvent(stream);
      assert.ok(deleted.kind === "changed", JSON.stringify(deleted));
      assert.deepEqual([deleted.type, deleted.etag, deleted.organizationId], ["deleted", "", org]);
    } finally {
      abort.abort();
    }
  });

  test("aborting the signal ends a pending iteration without an error", async () => {
    const abort = new AbortController();
    const seen: WatchEvent[] = [];
    const options = { signal: abort.signal, requestId: "req-ts-watch-abort" };
    const consumed = (async () => {
      for await (const event of client.watchConfigChanges({ organizationId: newOrg() }, options)) {
        seen.push(event);
        if (event.kind === "started") setTimeout(() => abort.abort(), 50); // while the loop waits for the next event
      }
    })();
    await withTimeout(consumed, "the iteration did not end after the abort");
    assert.deepEqual(
      seen.map((event) => event.kind),
      ["started"],
    );
    await streamEnded("req-ts-watch-abort", "CANCELLED");

    // A signal aborted before the iteration: nothing is sent, nothing is yielded.
    const none: WatchEvent[] = [];
    for await (const event of client.watchConfigChanges({}, { signal: AbortSignal.abort() })) none.push(event);
    assert.deepEqual(none, []);
  });

  test("breaking out of the loop cancels the stream; each iteration opens its own, with its own started event", async () => {
    const org = newOrg();
    const changes = client.watchConfigChanges({ organizationId: org }, { requestId: "req-ts-watch-break" });
    for (let round = 1; round <= 2; round++) {
      let kinds = "";
      for await (const event of changes) {
        kinds += event.kind;
        if (event.kind === "started") await client.saveIntegration(org, "stripe", STRIPE);
        if (event.kind === "changed") break;
      }
      assert.equal(kinds, "startedchanged", `round ${round}`);
      // Cancelled on the service while this client stays open, not left running until close().
      await streamEnded("req-ts-watch-break", "CANCELLED", round);
    }
  });

  test("a bad scope throws InvalidArgumentError naming the field, on the first iteration", async () => {
    const events = client.watchConfigChanges({ organizationId: newOrg(), providers: ["stripe", "no_such_provider"] });
    const error = await rejection(nextEvent(events[Symbol.asyncIterator]()));
    assert.ok(error instanceof InvalidArgumentError, String(error));
    assert.deepEqual(
      error.fieldViolations.map((violation) => violation.field),
      ["providers[1]"],
    );
    assert.match(error.requestId, /\S/);
  });

  test("close() ends a pending iteration without an error", async () => {
    const own = new IntegrationsClient({ target: PLAIN_TARGET });
    const stream = own.watchConfigChanges({ organizationId: newOrg() })[Symbol.asyncIterator]();
    assert.equal((await nextEvent(stream)).kind, "started");
    const pending = stream.next();
    own.close();
    assert.deepEqual(await withTimeout(pending, "the iteration did not end after close()"), { done: true, value: undefined });
  });
});
