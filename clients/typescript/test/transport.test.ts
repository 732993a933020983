/** The client against sockets that misbehave (reset, refused): no service needed. */

import assert from "node:assert/strict";
import { createServer as createHttp2Server, type ServerHttp2Stream } from "node:http2";
import { connect, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { after, describe, test } from "node:test";
import { inspect } from "node:util";

import { ConfigurationError, IntegrationsClient, UnavailableError } from "../src/index.js";
import { SK, rejection, withTimeout } from "./helpers.js";

interface Listener {
  target: string;
  connections: () => number;
  close: () => Promise<void>;
}

/** A TCP listener that does `onSocket` with every connection it accepts. */
async function listener(onSocket: (socket: Socket) => void): Promise<Listener> {
  let connections = 0;
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    connections += 1;
    sockets.add(socket);
    socket.on("error", () => socket.destroy()).on("close", () => sockets.delete(socket));
    onSocket(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    target: `127.0.0.1:${port}`,
    connections: () => connections,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

describe("misbehaving connections", () => {
  const cleanup: Array<() => unknown> = [];
  after(async () => {
    for (const step of cleanup.reverse()) await step();
  });

  test("a connection reset (ECONNRESET) is UnavailableError, never a ConflictError (ABORTED is the service's stale etag)", async () => {
    // Reads the start of the HTTP/2 connection (preface, settings, the call's headers), then resets
    // it, as a service that crashes or a proxy that gives up does.
    const resetting = await listener((socket) => socket.once("data", () => setTimeout(() => socket.resetAndDestroy(), 20)));
    const client = new IntegrationsClient({ target: resetting.target, retry: { maxAttempts: 2 } });
    cleanup.push(resetting.close, () => client.close());

    const read = await rejection(client.listProviders());
    assert.ok(read instanceof UnavailableError, String(read));
    assert.equal(read.code, "UNAVAILABLE");
    assert.equal(resetting.connections(), 2, "a read is retried after a reset");

    const write = await rejection(client.saveIntegration("org_ts_reset", "stripe", { secretKey: SK }));
    assert.ok(write instanceof UnavailableError, String(write));
    for (const shown of [String(write), JSON.stringify(write), inspect(write, { depth: Infinity, showHidden: true })]) {
      assert.ok(!shown.includes(SK), `the failed save's error shows the secret: ${shown}`);
    }
    assert.equal(resetting.connections(), 3, "a write is not retried");

    const watch = await rejection(
      (async () => {
        for await (const event of client.watchConfigChanges()) assert.fail(`unexpected ${event.kind}`);
      })(),
    );
    assert.ok(watch instanceof UnavailableError, `a reset watch is resubscribed (followChanges), not fatal: ${String(watch)}`);
  });

  test("a connection the network corrupts (an HTTP/2 protocol error) is UnavailableError; calling again or close() at once does not crash the process", async () => {
    // A real HTTP/2 peer that takes calls and never answers, behind a proxy that can corrupt what the client receives.
    const streams: ServerHttp2Stream[] = [];
    const peer = createHttp2Server();
    peer.on("stream", (stream) => void streams.push(stream.on("error", () => undefined)));
    peer.on("sessionError", () => undefined);
    await new Promise<void>((resolve) => peer.listen(0, "127.0.0.1", resolve));
    const peerPort = (peer.address() as AddressInfo).port;
    const toClient: Socket[] = [];
    const proxy = await listener((socket) => {
      const upstream = connect(peerPort, "127.0.0.1");
      upstream.on("error", () => socket.destroy()).on("close", () => socket.destroy());
      socket.on("close", () => upstream.destroy());
      socket.pipe(upstream).pipe(socket);
      toClient.push(socket);
    });
    const client = new IntegrationsClient({ target: proxy.target, timeoutMs: 5_000, retry: { maxAttempts: 1 } });
    cleanup.push(
      () => new Promise<void>((resolve) => peer.close(() => resolve())),
      () => streams.forEach((stream) => stream.destroy()),
      proxy.close,
      () => client.close(),
    );
    const crashes: unknown[] = [];
    const onCrash = (error: unknown): void => void crashes.push(error);
    process.on("uncaughtException", onCrash);
    try {
      const first = client.listProviders();
      for (const started = Date.now(); streams.length < 1 && Date.now() - started < 5_000; ) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      // HEADERS (END_STREAM, END_HEADERS) on stream 99, which the client never opened: a connection error (PROTOCOL_ERROR).
      for (const socket of toClient) {
        socket.unpipe();
        socket.write(Buffer.from([0, 0, 4, 0x01, 0x05, 0, 0, 0, 99, 1, 2, 3, 4]));
      }
      const broken = await rejection(first);
      // The connection is gone, as after a reset: UNAVAILABLE (retried for reads; a watch resubscribes).
      assert.ok(broken instanceof UnavailableError, String(broken));
      // At once, before Node has emitted the dead connection's error: another call, then close().
      const again = rejection(client.listProviders(null, null, { timeoutMs: 300 }));
      client.close();
      assert.ok((await again) instanceof ConfigurationError);
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.deepEqual(crashes.map(String), [], "an unhandled 'error' of the HTTP/2 session would have ended the process");
    } finally {
      process.off("uncaughtException", onCrash);
    }
  });

  test("close() during a read's retry backoff, or while it waits for its answer, ends the read at once, with no new connection", async () => {
    const refusing = await listener((socket) => socket.destroy());
    const client = new IntegrationsClient({
      target: refusing.target,
      timeoutMs: 10_000,
      retry: { initialBackoffMs: 2_000, maxBackoffMs: 2_000 },
    });
    cleanup.push(refusing.close);
    const read = rejection(client.listProviders());
    for (const started = Date.now(); refusing.connections() < 1 && Date.now() - started < 5_000; ) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await new Promise((resolve) => setTimeout(resolve, 100)); // into the backoff
    const closed = Date.now();
    client.close();
    const error = await withTimeout(read, "the read went on after close()", 1_000);
    assert.ok(error instanceof ConfigurationError && /closed/.test(error.message), String(error));
    assert.ok(Date.now() - closed < 500, `ended ${Date.now() - closed} ms after close()`);
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(refusing.connections(), 1, "no connection was opened after close()");

    // A read in flight (the service not answering yet) ends the same way, not retried.
    const silent = await listener(() => undefined);
    cleanup.push(silent.close);
    const other = new IntegrationsClient({ target: silent.target, timeoutMs: 10_000 });
    const pending = rejection(other.getConfig("org_ts_closed", "stripe"));
    for (const started = Date.now(); silent.connections() < 1 && Date.now() - started < 5_000; ) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    other.close();
    const cut = await withTimeout(pending, "the read went on after close()", 1_000);
    assert.ok(cut instanceof ConfigurationError && /closed/.test(cut.message), String(cut));
    assert.equal(silent.connections(), 1);
  });
});
