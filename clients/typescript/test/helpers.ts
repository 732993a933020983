/**
 * Shared by the tests: where the real servers are (set by tests/integration/test_typescript_client.py,
 * which starts them), fresh organization ids, and the JSON-safety check every result goes through.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";

import type { TlsOptions, WatchEvent } from "../src/index.js";

export const PLAIN_TARGET = process.env["ITS_PLAIN_TARGET"] ?? "";
/** The stderr file of the plaintext server: its log, one line per call or stream. */
export const PLAIN_LOG = process.env["ITS_PLAIN_LOG"] ?? "";
export const MTLS_TARGET = process.env["ITS_MTLS_TARGET"] ?? "";
export const CERTS_DIR = process.env["ITS_CERTS_DIR"] ?? "";
/** An organization whose stored Stripe secretKey cannot be decrypted (planted by the pytest). */
export const DATA_LOSS_ORG = process.env["ITS_DATA_LOSS_ORG"] ?? "";
/** STRIPE_WEBHOOK_SECRET of the servers: the environment default of webhookSecret. */
export const WEBHOOK_DEFAULT = process.env["ITS_WEBHOOK_DEFAULT"] ?? "";

export const SK = "sk_test_51HxTypeScriptClient004242";
export const SK_2 = "sk_test_51HxTypeScriptClient009999";
export const PK = "pk_test_51HxTypeScriptClient0001";
export const PK_2 = "pk_test_51HxTypeScriptClient0002";
export const WH = "whsec_typescript_client_org_0001";
export const MASKED_SK = "••••••••4242";

export function newOrg(): string {
  return `org_ts_${randomBytes(6).toString("hex")}`;
}

export function skipUnless(value: string, name: string): { skip: string } | Record<string, never> {
  return value ? {} : { skip: `${name} is not set (tests/integration/test_typescript_client.py sets it)` };
}

export function certs(role: "dashboard" | "commerce" | "admin", serverName?: string): TlsOptions {
  const tls: TlsOptions = {
    caFile: join(CERTS_DIR, "ca.crt"),
    certFile: join(CERTS_DIR, `${role}.crt`),
    keyFile: join(CERTS_DIR, `${role}.key`),
  };
  if (serverName) tls.serverName = serverName;
  return tls;
}

/** What a Next.js server action does to a result: it must come back equal, with nothing lost or changed. */
export function assertJsonSafe(value: unknown): void {
  assert.deepStrictEqual(JSON.parse(JSON.stringify(value)), value);
  assertPlain(value, "result");
}

function assertPlain(value: unknown, path: string): void {
  assert.ok(typeof value !== "bigint" && typeof value !== "function" && typeof value !== "undefined", path);
  if (value === null || typeof value !== "object") return;
  const prototype = Object.getPrototypeOf(value);
  assert.ok(
    Array.isArray(value) || prototype === Object.prototype,
    `${path} is a ${String(prototype?.constructor?.name)}, not a plain object`,
  );
  assert.ok(!("$typeName" in value), `${path} is a protobuf message`);
  for (const [key, item] of Object.entries(value)) assertPlain(item, `${path}.${key}`);
}

export async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("expected the call to fail");
}

/** `promise`, or a failure saying `message` after `ms`: a test that waits for the service must not hang. */
export async function withTimeout<T>(promise: Promise<T>, message: string, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(message)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The watch stream's next event; fails when it ends instead, or when none comes within 10 s. */
export async function nextEvent(stream: AsyncIterator<WatchEvent>): Promise<WatchEvent> {
  const result = await withTimeout(stream.next(), "no watch event within 10 s");
  assert.ok(!result.done, "the watch stream ended");
  return result.value;
}

/** Until the plaintext server logged that `count` streams with `requestId` ended with `code` (fails after 5 s). */
export async function streamEnded(requestId: string, code: string, count = 1): Promise<void> {
  const line = new RegExp(`^.*stream ended .*code=${code} .*request_id=${requestId}\\b.*$`, "gm");
  for (const started = Date.now(); Date.now() - started < 5_000; ) {
    if ((await readFile(PLAIN_LOG, "utf8")).match(line)?.length === count) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.fail(`the service did not log the end of ${count} stream(s) ${requestId} (${code}) within 5 s`);
}
