/** A service that stops (SIGTERM, sent here to its process) ends an open watch with UnavailableError at once. */

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { IntegrationsClient, UnavailableError } from "../src/index.js";
import { nextEvent, rejection, skipUnless } from "./helpers.js";

const TARGET = process.env["ITS_SHUTDOWN_TARGET"] ?? "";
const PID = Number(process.env["ITS_SHUTDOWN_PID"] ?? "");

describe("watch across a service shutdown", skipUnless(TARGET, "ITS_SHUTDOWN_TARGET"), () => {
  const client = TARGET ? new IntegrationsClient({ target: TARGET }) : undefined!;
  after(() => client?.close());

  test("the service stopping surfaces as UnavailableError with the stream's request id", async () => {
    const stream = client.watchConfigChanges({}, { requestId: "req-ts-watch-shutdown" })[Symbol.asyncIterator]();
    assert.equal((await nextEvent(stream)).kind, "started");
    const started = Date.now();
    process.kill(PID, "SIGTERM");
    const error = await rejection(nextEvent(stream));
    assert.ok(error instanceof UnavailableError, String(error));
    assert.match(error.message, /shutting down/);
    assert.equal(error.requestId, "req-ts-watch-shutdown");
    // Promptly: the service ends its streams at once, and the client does not hang on the closing connection.
    assert.ok(Date.now() - started < 5_000, `${Date.now() - started} ms`);
    // The iterator is finished: a stream is not reopened behind the caller's back.
    assert.deepEqual(await stream.next(), { done: true, value: undefined });
  });
});
