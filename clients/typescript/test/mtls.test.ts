/** Mutual TLS with the certificates of `integrations-service dev-certs`: the dashboard's and the commerce service's roles. */

import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";
import { after, describe, test } from "node:test";
import { inspect } from "node:util";

import {
  ConfigurationError,
  ENV_CA,
  ENV_CERT,
  ENV_KEY,
  ENV_TARGET,
  IntegrationsClient,
  IntegrationsError,
  PermissionDeniedError,
  UnavailableError,
} from "../src/index.js";
import { CERTS_DIR, MASKED_SK, MTLS_TARGET, PK, SK, WEBHOOK_DEFAULT, assertJsonSafe, certs, newOrg, rejection, skipUnless } from "./helpers.js";

describe("mutual TLS", skipUnless(MTLS_TARGET, "ITS_MTLS_TARGET"), () => {
  const clients: IntegrationsClient[] = [];
  after(() => clients.forEach((client) => client.close()));

  function client(role: "dashboard" | "commerce" | "admin", serverName?: string, timeoutMs = 5_000): IntegrationsClient {
    const made = new IntegrationsClient({ target: MTLS_TARGET, tls: certs(role, serverName), timeoutMs });
    clients.push(made);
    return made;
  }

  test("the dashboard's certificate: list, save, masked read, delete", async () => {
    const dashboard = client("dashboard");
    const org = newOrg();
    const saved = await dashboard.saveIntegration(org, "stripe", { secretKey: SK, publishableKey: PK });
    assert.equal(saved.values["secretKey"]?.value, MASKED_SK);
    const status = await dashboard.listProviders(org, "payments");
    assert.deepEqual(status.map((p) => [p.id, p.configured]), [["stripe", true], ["easypay", false], ["ifthenpay", false]]);
    const masked = await dashboard.getConfig(org, "stripe");
    assert.deepEqual(masked, saved);
    for (const result of [saved, status, masked]) assertJsonSafe(result);
    await dashboard.deleteIntegration(org, "stripe", { etag: masked.etag });
    assert.equal((await dashboard.getConfig(org, "stripe")).etag, "");
  });

  test("the dashboard may not read decrypted values: PermissionDeniedError with the request id", async () => {
    const error = await rejection(client("dashboard").getDecryptedConfig(newOrg(), "stripe"));
    assert.ok(error instanceof PermissionDeniedError, String(error));
    assert.equal(error.code, "PERMISSION_DENIED");
    assert.ok(error.requestId);
    assertJsonSafe(error.toJSON());
  });

  test("the commerce certificate reads decrypted values and may not write", async () => {
    const org = newOrg();
    await client("dashboard").saveIntegration(org, "stripe", { secretKey: SK });
    const commerce = client("commerce");
    const clear = await commerce.getDecryptedConfig(org, "stripe");
    assertJsonSafe(clear);
    assert.equal(clear.values["secretKey"]?.value, SK);
    assert.deepEqual(clear.values["webhookSecret"], { value: WEBHOOK_DEFAULT, source: "environment", secret: true });

    const write = await rejection(commerce.saveIntegration(org, "stripe", { publishableKey: PK }));
    assert.ok(write instanceof PermissionDeniedError, String(write));
    assert.ok(write.requestId);
    const remove = await rejection(commerce.deleteIntegration(org, "stripe"));
    assert.ok(remove instanceof PermissionDeniedError, String(remove));
  });

  test("fromEnv reads the Python client's variables", async () => {
    const env = {
      [ENV_TARGET]: MTLS_TARGET,
      [ENV_CA]: join(CERTS_DIR, "ca.crt"),
      [ENV_CERT]: join(CERTS_DIR, "dashboard.crt"),
      [ENV_KEY]: join(CERTS_DIR, "dashboard.key"),
    };
    const fromEnv = IntegrationsClient.fromEnv(env);
    clients.push(fromEnv);
    assert.equal((await fromEnv.listProviders())[0]?.id, "stripe");
    assert.throws(
      () => IntegrationsClient.fromEnv({ ...env, [ENV_KEY]: join(CERTS_DIR, "commerce.key") }),
      (error: unknown) => error instanceof ConfigurationError && /do not form a valid set/.test(error.message),
      "a key that is not the certificate's fails at start-up",
    );
    assert.throws(() => IntegrationsClient.fromEnv({ ...env, [ENV_KEY]: "" }), (error: unknown) => {
      assert.ok(error instanceof ConfigurationError);
      assert.match(error.message, new RegExp(`^${ENV_KEY} is not set`));
      return true;
    });
  });

  test("the server's certificate is checked: the name it carries passes, another name fails", async () => {
    assert.equal((await client("dashboard", "localhost").listProviders())[0]?.id, "stripe");
    const wrong = await rejection(client("dashboard", "integrations.example.com", 1_000).listProviders());
    assert.ok(wrong instanceof IntegrationsError, String(wrong));
    assert.match(wrong.message, /does not match certificate/);
  });

  test("a plaintext client cannot talk to the TLS service", async () => {
    const plain = new IntegrationsClient({ target: MTLS_TARGET, timeoutMs: 1_000 });
    clients.push(plain);
    const error = await rejection(plain.listProviders());
    assert.ok(error instanceof UnavailableError, String(error));
  });

  test("rotated certificate files are used by new connections without a restart; a broken set keeps the old", async () => {
    const live = mkdtempSync(join(tmpdir(), "its-rotation-"));
    const file = (name: string): string => join(live, name);
    copyFileSync(join(CERTS_DIR, "ca.crt"), file("ca.crt"));
    copyFileSync(join(CERTS_DIR, "dashboard.crt"), file("tls.crt"));
    copyFileSync(join(CERTS_DIR, "dashboard.key"), file("tls.key"));
    const warnings: Error[] = [];
    const onWarning = (warning: Error): void => void warnings.push(warning);
    process.on("warning", onWarning);
    try {
      const rotating = new IntegrationsClient({
        target: MTLS_TARGET,
        tls: { caFile: file("ca.crt"), certFile: file("tls.crt"), keyFile: file("tls.key") },
        timeoutMs: 5_000,
      });
      clients.push(rotating);
      const org = newOrg();
      await client("dashboard").saveIntegration(org, "stripe", { secretKey: SK });
      // Today's certificate is the dashboard's: no decrypted view.
      assert.ok((await rejection(rotating.getDecryptedConfig(org, "stripe"))) instanceof PermissionDeniedError);

      // Half a rotation: the new certificate (the commerce service's identity) next to the old key.
      writeFileSync(file("tls.crt"), readCert("commerce"));
      await delay(1_100);
      assert.equal((await rotating.listProviders())[0]?.id, "stripe", "the previous files stay in use");
      assert.ok(
        warnings.some((w) => (w as { code?: string }).code === "INTEGRATIONS_TLS_RELOAD" && /valid set/.test(w.message)),
        "a warning says why the new files were not taken",
      );
      assert.ok((await rejection(rotating.getDecryptedConfig(org, "stripe"))) instanceof PermissionDeniedError);

      // The key lands: new connections present the new certificate.
      copyFileSync(join(CERTS_DIR, "commerce.key"), file("tls.key"));
      await delay(1_100);
      const clear = await rotating.getDecryptedConfig(org, "stripe");
      assert.equal(clear.values["secretKey"]?.value, SK);
    } finally {
      process.off("warning", onWarning);
      rmSync(live, { recursive: true, force: true });
    }
  });
});

describe("TLS files", skipUnless(CERTS_DIR, "ITS_CERTS_DIR"), () => {
  test("a client prints and serializes without its key: console.log, util.inspect, JSON.stringify, spread", () => {
    const client = new IntegrationsClient({ target: "127.0.0.1:9", tls: certs("dashboard") });
    try {
      const pem = readFileSync(certs("dashboard").keyFile);
      const body = pem.toString("latin1").split("\n")[1]!.slice(0, 16); // the key's first base64 characters
      const hex = [...pem.subarray(28, 44)].map((byte) => byte.toString(16).padStart(2, "0")).join(" ");
      const shown = [
        inspect(client),
        inspect(client, { depth: Infinity, showHidden: true }),
        JSON.stringify(client),
        JSON.stringify({ ...client }),
        inspect({ ...client }, { depth: Infinity }),
      ];
      for (const text of shown) {
        assert.ok(!text.includes(body) && !text.includes(hex), `key material in: ${text.slice(0, 400)}`);
        assert.ok(!/PRIVATE KEY|<Buffer|"type":"Buffer"/.test(text), `file contents in: ${text.slice(0, 400)}`);
      }
      assert.match(inspect(client), /127\.0\.0\.1:9/);
    } finally {
      client.close();
    }
  });

  test("a file that is not what it should be fails at start-up naming that option and file, never its contents", () => {
    const broken = mkdtempSync(join(tmpdir(), "its-tls-files-"));
    const junk = join(broken, "junk.pem");
    writeFileSync(junk, "not a PEM file\n");
    const key = join(CERTS_DIR, "dashboard.key");
    const expect = (tls: Partial<ReturnType<typeof certs>>, pattern: RegExp): void => {
      assert.throws(
        () => new IntegrationsClient({ target: "127.0.0.1:9", tls: { ...certs("dashboard"), ...tls } }).close(),
        (error: unknown) => {
          assert.ok(error instanceof ConfigurationError, String(error));
          assert.match(error.message, pattern);
          assert.ok(!/BEGIN|PRIVATE/.test(error.message), error.message);
          return true;
        },
      );
    };
    try {
      expect({ caFile: key }, new RegExp(`^tls\\.caFile: ${JSON.stringify(key)} holds no PEM certificate`));
      expect({ caFile: junk }, new RegExp(`^tls\\.caFile: ${JSON.stringify(junk)} holds no PEM certificate`));
      expect({ certFile: key }, new RegExp(`^tls\\.certFile: ${JSON.stringify(key)} holds no PEM certificate`));
      expect({ keyFile: junk }, new RegExp(`^tls\\.keyFile: ${JSON.stringify(junk)} holds no usable PEM private key`));
      expect({ keyFile: join(CERTS_DIR, "dashboard.crt") }, /^tls\.keyFile: .*dashboard\.crt" holds no usable PEM private key/);
      expect(
        { keyFile: join(CERTS_DIR, "commerce.key") },
        /^tls: the files do not form a valid set: the key in tls\.keyFile ".*commerce\.key" is not the certificate's \(tls\.certFile ".*dashboard\.crt"\)$/,
      );
    } finally {
      rmSync(broken, { recursive: true, force: true });
    }
  });
});

function readCert(role: string): Buffer {
  return readFileSync(join(CERTS_DIR, `${role}.crt`));
}
