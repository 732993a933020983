/** The service up, its PostgreSQL store unreachable (the pytest cut the proxy in between): UNAVAILABLE from the service itself. */

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { IntegrationsClient, UnavailableError } from "../src/index.js";
import { SK, newOrg, rejection, skipUnless } from "./helpers.js";

const TARGET = process.env["ITS_OUTAGE_TARGET"] ?? "";

describe("store outage", skipUnless(TARGET, "ITS_OUTAGE_TARGET"), () => {
  const client = TARGET ? new IntegrationsClient({ target: TARGET, timeoutMs: 15_000 }) : undefined!;
  after(() => client?.close());

  test("reads end in UnavailableError carrying the service's request id, after the retries", async () => {
    const started = Date.now();
    const error = await rejection(client.getConfig(newOrg(), "stripe", { requestId: "req-ts-outage-read" }));
    assert.ok(error instanceof UnavailableError, String(error));
    assert.equal(error.requestId, "req-ts-outage-read");
    assert.ok(Date.now() - started >= 500, "retried with backoff before giving up");
    const listed = await rejection(client.listProviders(newOrg()));
    assert.ok(listed instanceof UnavailableError, String(listed));
    assert.match(listed.requestId, /\S/);
  });

  test("a write ends in UnavailableError at once, with its request id, and is not retried", async () => {
    const started = Date.now();
    const error = await rejection(client.saveIntegration(newOrg(), "stripe", { secretKey: SK }));
    assert.ok(error instanceof UnavailableError, String(error));
    assert.match(error.requestId, /\S/);
    assert.ok(Date.now() - started < 5_000);
  });
});
