// Run by tests/integration/test_typescript_client.py: the README's follow-changes.ts, compiled, against a
// real service through a TCP proxy whose connections this script cuts once, so the example has to resubscribe.
import assert from "node:assert/strict";
import { connect, createServer } from "node:net";

import { IntegrationsClient, InvalidArgumentError } from "@integrations/client";
import { followChanges } from "./out/follow-changes.js";

const [host, port] = process.env.INTEGRATIONS_SERVICE_TARGET.split(":");
const organizationId = process.env.DOC_ORGANIZATION;
const SK = "sk_test_51HxReadmeWatchExample4242", PK = "pk_test_51HxReadmeWatchExample01";

const sockets = new Set();
const proxy = createServer((socket) => {
  const upstream = connect(Number(port), host);
  for (const end of [socket, upstream]) {
    sockets.add(end);
    end.on("error", () => undefined).on("close", () => {
      socket.destroy();
      upstream.destroy();
      sockets.delete(end);
    });
  }
  socket.pipe(upstream).pipe(socket);
});
await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
const client = new IntegrationsClient({ target: `127.0.0.1:${proxy.address().port}` });

const seen = [];
async function until(predicate, what) {
  for (const started = Date.now(); !predicate(); await new Promise((resolve) => setTimeout(resolve, 20))) {
    assert.ok(Date.now() - started < 10_000, `${what}; seen: ${JSON.stringify(seen)}`);
  }
}
const resets = () => seen.filter((entry) => entry === "reset").length;

const stop = new AbortController();
const following = followChanges(
  client,
  { organizationId, providers: ["stripe"] },
  { reset: () => seen.push("reset"), changed: (event) => seen.push(`${event.type} ${event.provider} ${event.etag}`) },
  stop.signal,
);
await until(() => resets() === 1, "no reset for the first started event");

const saved = await client.saveIntegration(organizationId, "stripe", { secretKey: SK, publishableKey: PK });
await until(() => seen.includes(`saved stripe ${saved.etag}`), "the save was not seen");
await client.saveIntegration(`${organizationId}_other`, "stripe", { secretKey: SK, publishableKey: PK });

// The connection drops: a reset at once, then another when the resubscribed stream is live.
for (const socket of sockets) socket.destroy();
await until(() => resets() === 3, "the example did not resubscribe after the connection dropped");
const again = await client.saveIntegration(organizationId, "stripe", { publishableKey: PK }, { etag: saved.etag });
await client.deleteIntegration(organizationId, "stripe", { etag: again.etag });
await until(() => seen.includes("deleted stripe "), "the delete after resubscribing was not seen");
assert.deepEqual(seen, ["reset", `saved stripe ${saved.etag}`, "reset", "reset", `saved stripe ${again.etag}`, "deleted stripe "]);

stop.abort();
await following; // ends, without an error

// An error it does not retry (INVALID_ARGUMENT here; a service-sent INTERNAL takes the same path): it calls
// reset() before it rejects, so what was derived before is not left behind with nothing following it.
const givenUp = [];
await assert.rejects(
  followChanges(
    client,
    { organizationId, providers: ["no-such-provider"] },
    { reset: () => givenUp.push("reset"), changed: (event) => givenUp.push(event.type) },
    new AbortController().signal,
  ),
  (error) => error instanceof InvalidArgumentError,
);
assert.deepEqual(givenUp, ["reset"]);
client.close();
proxy.close();
console.log("readme watch example: ok");
