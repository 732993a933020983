/**
 * Deadlines and retries on real sockets: a TCP proxy in front of the real service that refuses
 * (closes) its first connections, and a listener that accepts and never answers.
 */

import assert from "node:assert/strict";
import { createServer, connect, type AddressInfo, type Server, type Socket } from "node:net";
import { after, describe, test } from "node:test";

import { DeadlineExceededError, IntegrationsClient, IntegrationsError, UnavailableError } from "../src/index.js";
import { PLAIN_TARGET, SK, newOrg, rejection, skipUnless } from "./helpers.js";

interface Proxy {
  target: string;
  connections: () => number;
  close: () => Promise<void>;
}

/** Closes its first `refuse` connections at once (the client sees UNAVAILABLE), then forwards to `upstream`. */
async function proxy(upstream: string, refuse: number): Promise<Proxy> {
  const [host, port] = splitTarget(upstream);
  let connections = 0;
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    connections += 1;
    if (connections <= refuse) {
      socket.destroy();
      return;
    }
    const forward = connect(port, host);
    sockets.add(forward);
    socket.pipe(forward).pipe(socket);
    const end = (): void => {
      socket.destroy();
      forward.destroy();
    };
    socket.on("error", end).on("close", end);
    forward.on("error", end).on("close", end);
  });
  return listening(server, sockets, () => connections);
}

/** Accepts connections and never answers: every call runs into its deadline. */
async function blackHole(): Promise<Proxy> {
  let connections = 0;
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    connections += 1;
    sockets.add(socket);
    socket.on("error", () => socket.destroy());
  });
  return listening(server, sockets, () => connections);
}

async function listening(server: Server, sockets: Set<Socket>, connections: () => number): Promise<Proxy> {
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    target: `127.0.0.1:${port}`,
    connections,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

function splitTarget(target: string): [string, number] {
  const index = target.lastIndexOf(":");
  return [target.slice(0, index), Number(target.slice(index + 1))];
}

describe("deadlines and retries", skipUnless(PLAIN_TARGET, "ITS_PLAIN_TARGET"), () => {
  const cleanup: Array<() => unknown> = [];
  after(async () => {
    for (const step of cleanup.reverse()) await step();
  });

  async function through(server: Proxy, options: { timeoutMs?: number } = {}): Promise<IntegrationsClient> {
    const client = new IntegrationsClient({ target: server.target, ...options });
    cleanup.push(server.close, () => client.close());
    return client;
  }

  test("a read is retried on UNAVAILABLE and succeeds once the service answers", async () => {
    const refusing = await proxy(PLAIN_TARGET, 2);
    const client = await through(refusing);
    const providers = await client.listProviders();
    assert.equal(providers[0]?.id, "stripe");
    assert.equal(refusing.connections(), 3);
  });

  test("GetProviderConfig is retried too, and gives up after maxAttempts with UnavailableError", async () => {
    const refusing = await proxy(PLAIN_TARGET, 100);
    const client = await through(refusing, { timeoutMs: 5_000 });
    const started = Date.now();
    const error = await rejection(client.getConfig(newOrg(), "stripe"));
    assert.ok(error instanceof UnavailableError, String(error));
    assert.equal(error.code, "UNAVAILABLE");
    assert.equal(refusing.connections(), 4, "the default maxAttempts");
    // Backoffs of about 100, 200 and 400 ms (±20 %) lie between the attempts.
    assert.ok(Date.now() - started >= 500, `gave up after ${Date.now() - started} ms`);
  });

  test("writes are never retried", async () => {
    const refusing = await proxy(PLAIN_TARGET, 1);
    const client = await through(refusing);
    const org = newOrg();
    const save = await rejection(client.saveIntegration(org, "stripe", { secretKey: SK }));
    assert.ok(save instanceof UnavailableError, String(save));
    assert.equal(refusing.connections(), 1);
    // The next call gets a connection through: it was the first save's one attempt that failed.
    await client.deleteIntegration(org, "stripe", { allowMissing: true });
    assert.equal(refusing.connections(), 2);
  });

  test("a call that gets no answer ends at its deadline: the default, or the per-call timeoutMs", async () => {
    const silent = await blackHole();
    const client = await through(silent, { timeoutMs: 600 });
    let started = Date.now();
    const byDefault = await rejection(client.listProviders());
    assert.ok(byDefault instanceof DeadlineExceededError, String(byDefault));
    assert.equal(byDefault.code, "DEADLINE_EXCEEDED");
    let elapsed = Date.now() - started;
    assert.ok(elapsed >= 550 && elapsed < 2_000, `took ${elapsed} ms`);

    started = Date.now();
    const perCall = await rejection(client.getConfig(newOrg(), "stripe", { timeoutMs: 150 }));
    assert.ok(perCall instanceof DeadlineExceededError, String(perCall));
    elapsed = Date.now() - started;
    assert.ok(elapsed >= 120 && elapsed < 550, `took ${elapsed} ms`);
  });

  test("without a timeout of its own a call ends at the default deadline, 2 s", async () => {
    const silent = await blackHole();
    const client = await through(silent);
    const started = Date.now();
    const error = await rejection(client.listProviders());
    const elapsed = Date.now() - started;
    assert.ok(error instanceof DeadlineExceededError, String(error));
    assert.ok(elapsed >= 1_950 && elapsed < 3_500, `took ${elapsed} ms`);
  });

  test("a call the caller aborts is CANCELLED and not retried", async () => {
    const silent = await blackHole();
    const client = await through(silent, { timeoutMs: 5_000 });
    const started = Date.now();
    const error = await rejection(client.listProviders(null, null, { signal: AbortSignal.timeout(150) }));
    assert.ok(error instanceof IntegrationsError && !(error instanceof UnavailableError), String(error));
    assert.equal(error.code, "CANCELLED");
    assert.ok(Date.now() - started < 2_000);
    assert.equal(silent.connections(), 1);
  });
});
