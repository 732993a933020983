/** Settings and the pure rules of the facade: no server needed. */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  ConfigurationError,
  IntegrationsClient,
  MASK_CHARACTER,
  optionsFromEnv,
  withoutMaskedValues,
} from "../src/index.js";

function configurationError(pattern: RegExp): (error: unknown) => boolean {
  return (error) => error instanceof ConfigurationError && pattern.test(error.message);
}

describe("settings", () => {
  test("optionsFromEnv: plaintext with the target alone, TLS with all three files, blank counts as unset", () => {
    assert.deepEqual(optionsFromEnv({ INTEGRATIONS_SERVICE_TARGET: " 127.0.0.1:50051 ", INTEGRATIONS_CLIENT_CA: " " }), {
      target: "127.0.0.1:50051",
    });
    assert.deepEqual(
      optionsFromEnv({
        INTEGRATIONS_SERVICE_TARGET: "integrations:443",
        INTEGRATIONS_CLIENT_CA: "/tls/ca.crt",
        INTEGRATIONS_CLIENT_CERT: "/tls/tls.crt",
        INTEGRATIONS_CLIENT_KEY: "/tls/tls.key",
      }),
      { target: "integrations:443", tls: { caFile: "/tls/ca.crt", certFile: "/tls/tls.crt", keyFile: "/tls/tls.key" } },
    );
  });

  test("optionsFromEnv names what is missing", () => {
    assert.throws(() => optionsFromEnv({}), configurationError(/^INTEGRATIONS_SERVICE_TARGET is not set/));
    assert.throws(
      () => optionsFromEnv({ INTEGRATIONS_SERVICE_TARGET: "h:1", INTEGRATIONS_CLIENT_CERT: "/c" }),
      configurationError(/^INTEGRATIONS_CLIENT_CA, INTEGRATIONS_CLIENT_KEY are not set: mutual TLS needs/),
    );
  });

  test("the constructor checks the target, the TLS files and the timeout before any call", () => {
    assert.throws(() => new IntegrationsClient({ target: "https://h:1" }), configurationError(/host:port/));
    assert.throws(() => new IntegrationsClient({ target: "h" }), configurationError(/names no port/));
    assert.throws(
      () => new IntegrationsClient({ target: "h:1", tls: { caFile: "/nonexistent/ca.crt", certFile: "/c", keyFile: "/k" } }),
      configurationError(/^tls\.caFile: cannot read "\/nonexistent\/ca\.crt" \(ENOENT\)$/),
    );
    assert.throws(() => new IntegrationsClient({ target: "h:1", timeoutMs: 0 }), configurationError(/timeoutMs/));
    // Node's timers hold at most 2^31-1 ms (24.8 days): a longer deadline would fire at once, failing every call.
    assert.throws(
      () => new IntegrationsClient({ target: "h:1", timeoutMs: 2 ** 31 }),
      configurationError(/^timeoutMs must be a positive number of milliseconds up to 2147483647, got 2147483648$/),
    );
    const client = new IntegrationsClient({ target: "[::1]:50051" });
    client.close();
    return assert.rejects(client.listProviders(), configurationError(/closed/));
  });
});

describe("plaintext", () => {
  test("without tls only a loopback target is accepted, so missing TLS settings never send credentials in clear", () => {
    for (const target of ["integrations.internal:50051", "10.0.0.5:50051", "[2001:db8::1]:443", "127.0.0.1.example.com:1"]) {
      assert.throws(
        () => new IntegrationsClient({ target }),
        configurationError(/is not a loopback address: without tls the client talks plaintext only to 127\.0\.0\.1, ::1 or localhost/),
        target,
      );
    }
    assert.throws(
      () => IntegrationsClient.fromEnv({ INTEGRATIONS_SERVICE_TARGET: "integrations.internal:50051" }),
      configurationError(/INTEGRATIONS_CLIENT_CA, INTEGRATIONS_CLIENT_CERT and INTEGRATIONS_CLIENT_KEY/),
    );
    for (const target of ["127.0.0.1:1", "127.0.0.2:1", "localhost:1", "LOCALHOST:1", "[::1]:1"]) {
      new IntegrationsClient({ target }).close();
    }
    // The service's INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS, on this side: said explicitly.
    new IntegrationsClient({ target: "integrations.internal:50051", insecurePlaintextAnyAddress: true }).close();
    IntegrationsClient.fromEnv({ INTEGRATIONS_SERVICE_TARGET: "10.0.0.5:1" }, { insecurePlaintextAnyAddress: true }).close();
  });
});

describe("masked values", () => {
  test("withoutMaskedValues drops every value holding the mask character, and nothing else", () => {
    const form = { secretKey: "••••••••4242", webhookSecret: "••••••••", publishableKey: "pk_test_1", note: "a•b" };
    assert.deepEqual(withoutMaskedValues(form), {
      values: { publishableKey: "pk_test_1" },
      dropped: ["secretKey", "webhookSecret", "note"],
    });
    assert.equal(MASK_CHARACTER, "\u2022");
  });

  test("saveIntegration refuses a value that is not a string before any call, without echoing it", async () => {
    const client = new IntegrationsClient({ target: "127.0.0.1:9" });
    const values = { secretKey: 4242 } as unknown as Record<string, string>;
    await assert.rejects(client.saveIntegration("org", "stripe", values), (error: unknown) => {
      assert.ok(error instanceof TypeError);
      assert.equal(error.message, 'values["secretKey"] is a number, not a string');
      return true;
    });
    client.close();
  });
});
