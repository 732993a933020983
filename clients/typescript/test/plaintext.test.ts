/** Every facade method against the real service in development mode (plaintext), on either store. */

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { inspect } from "node:util";

import {
  ConflictError,
  DataLossError,
  IntegrationsClient,
  IntegrationsError,
  InvalidArgumentError,
  NotFoundError,
  type Category,
} from "../src/index.js";
import {
  DATA_LOSS_ORG,
  MASKED_SK,
  PK,
  PK_2,
  PLAIN_TARGET,
  SK,
  SK_2,
  WEBHOOK_DEFAULT,
  WH,
  assertJsonSafe,
  newOrg,
  rejection,
  skipUnless,
} from "./helpers.js";

const STRIPE = { secretKey: SK, publishableKey: PK };

describe("plaintext service", skipUnless(PLAIN_TARGET, "ITS_PLAIN_TARGET"), () => {
  const client = PLAIN_TARGET ? new IntegrationsClient({ target: PLAIN_TARGET }) : undefined!;
  after(() => client?.close());

  test("listProviders: the catalog, a category, and an organization's status", async () => {
    const catalog = await client.listProviders();
    assertJsonSafe(catalog);
    assert.deepEqual(
      catalog.map((p) => p.id),
      ["stripe", "easypay", "ifthenpay", "resend", "smtp", "google_analytics"],
    );
    const stripe = catalog[0]!;
    assert.equal(stripe.displayName, "Stripe");
    assert.equal(stripe.category, "payments");
    assert.equal(stripe.runtimeSupported, true);
    assert.deepEqual(
      stripe.fields.map((f) => f.key),
      ["secretKey", "webhookSecret", "publishableKey"],
    );
    const secretKey = stripe.fields[0]!;
    assert.equal(secretKey.envVar, "STRIPE_SECRET_KEY");
    assert.equal(secretKey.secret, true);
    assert.equal(secretKey.required, true);
    assert.equal(stripe.fields.find((f) => f.key === "publishableKey")?.secret, false);

    const notifications = await client.listProviders(null, "notifications");
    assert.deepEqual(notifications.map((p) => p.id), ["resend", "smtp"]);
    assert.ok(notifications.every((p) => p.category === "notifications"));

    const org = newOrg();
    await client.saveIntegration(org, "stripe", { ...STRIPE, webhookSecret: WH });
    const status = await client.listProviders(org, "payments");
    assertJsonSafe(status);
    assert.deepEqual(
      status.map((p) => [p.id, p.configured, p.ready]),
      [["stripe", true, true], ["easypay", false, false], ["ifthenpay", false, false]],
    );
  });

  test("saveIntegration answers masked; getConfig is masked with sources, etag and an ISO update time", async () => {
    const org = newOrg();
    const saved = await client.saveIntegration(org, "stripe", STRIPE);
    assertJsonSafe(saved);
    assert.equal(saved.organizationId, org);
    assert.equal(saved.provider, "stripe");
    assert.deepEqual(saved.values["secretKey"], { value: MASKED_SK, source: "organization", secret: true });
    assert.deepEqual(saved.values["publishableKey"], { value: PK, source: "organization", secret: false });
    assert.ok(!JSON.stringify(saved).includes(SK));
    assert.ok(saved.etag);
    assert.equal(typeof saved.updateTime, "string");
    assert.equal(new Date(saved.updateTime!).toISOString(), saved.updateTime);
    assert.ok(Math.abs(Date.parse(saved.updateTime!) - Date.now()) < 60_000);

    const read = await client.getConfig(org, "stripe");
    assertJsonSafe(read);
    assert.deepEqual(read, saved);

    const unset = await client.getConfig(newOrg(), "easypay");
    assertJsonSafe(unset);
    assert.equal(unset.etag, "");
    assert.equal(unset.updateTime, null);
    assert.deepEqual(unset.values["apiKey"], { value: "", source: "unset", secret: true });
  });

  test("environment defaults: masked in getConfig, clear in getDecryptedConfig (development mode trusts every caller)", async () => {
    const org = newOrg();
    await client.saveIntegration(org, "stripe", { secretKey: SK });
    const masked = await client.getConfig(org, "stripe");
    assert.equal(masked.values["webhookSecret"]?.source, "environment");
    assert.ok(!JSON.stringify(masked).includes(WEBHOOK_DEFAULT), "an environment secret is masked too");
    // The platform's secret: the mask alone, not even its last 4 characters; the organization's keeps them.
    assert.deepEqual(masked.values["webhookSecret"], { value: "••••••••", source: "environment", secret: true });
    assert.equal(masked.values["secretKey"]?.value, MASKED_SK);
    const clear = await client.getDecryptedConfig(org, "stripe");
    assertJsonSafe(clear);
    assert.equal(clear.values["secretKey"]?.value, SK);
    assert.deepEqual(clear.values["webhookSecret"], { value: WEBHOOK_DEFAULT, source: "environment", secret: true });
  });

  test("saveIntegration with etag and clearFields; a stale etag is a ConflictError", async () => {
    const org = newOrg();
    const first = await client.saveIntegration(org, "stripe", STRIPE);
    const second = await client.saveIntegration(org, "stripe", {}, { etag: first.etag, clearFields: ["publishableKey"] });
    assertJsonSafe(second);
    assert.deepEqual(second.values["publishableKey"], { value: "", source: "unset", secret: false });
    assert.notEqual(second.etag, first.etag);

    const stale = await rejection(client.saveIntegration(org, "stripe", { publishableKey: PK_2 }, { etag: first.etag }));
    assert.ok(stale instanceof ConflictError);
    assert.ok(stale instanceof IntegrationsError);
    assert.equal(stale.code, "ABORTED");
    assert.ok(stale.requestId);
    assertJsonSafe(stale.toJSON());
    assert.equal((await client.getConfig(org, "stripe")).etag, second.etag, "the refused save changed nothing");
  });

  test("masked values posted back are dropped, so the stored secret stays", async () => {
    const org = newOrg();
    const saved = await client.saveIntegration(org, "stripe", STRIPE);
    // The form as a browser posts it back: every field that shows a value (blank ones are left out).
    const form = Object.fromEntries(
      Object.entries(saved.values).filter(([, { value }]) => value !== "").map(([key, { value }]) => [key, value]),
    );
    assert.equal(form["secretKey"], MASKED_SK);

    const changed = await client.saveIntegration(org, "stripe", { ...form, publishableKey: PK_2 }, { etag: saved.etag });
    assert.equal(changed.values["publishableKey"]?.value, PK_2);
    assert.equal((await client.getDecryptedConfig(org, "stripe")).values["secretKey"]?.value, SK);

    const unchanged = await client.saveIntegration(
      org,
      "stripe",
      { secretKey: changed.values["secretKey"]!.value },
      { etag: changed.etag },
    );
    assertJsonSafe(unchanged);
    assert.equal(unchanged.etag, changed.etag, "nothing to write: nothing written");
    assert.equal(unchanged.updateTime, changed.updateTime);

    const replaced = await client.saveIntegration(org, "stripe", { secretKey: SK_2 }, { etag: changed.etag });
    assert.equal(replaced.values["secretKey"]?.value, "••••••••9999");
  });

  test("InvalidArgumentError carries the field violations from google.rpc.BadRequest", async () => {
    const org = newOrg();
    const bad = await rejection(client.saveIntegration(org, "stripe", { secretKey: "pk_test_wrongKind0001" }));
    assert.ok(bad instanceof InvalidArgumentError);
    assert.equal(bad.code, "INVALID_ARGUMENT");
    assert.ok(bad.requestId);
    assert.deepEqual(bad.fieldViolations.map((v) => v.field), ["values.secretKey"]);
    assert.ok(bad.fieldViolations[0]!.description);
    assert.deepEqual(Object.keys(bad.byFormField()), ["secretKey"]);
    for (const shown of [String(bad), JSON.stringify(bad), inspect(bad, { depth: Infinity, showHidden: true })]) {
      assert.ok(!shown.includes("wrongKind"), `the error echoes the value: ${shown}`);
    }
    assertJsonSafe(bad.toJSON());

    const many = await rejection(
      client.saveIntegration("", "stripe", { noSuchField: "x" }, { clearFields: ["secretKey", "secretKey"] }),
    );
    assert.ok(many instanceof InvalidArgumentError);
    assert.ok(many.fieldViolations.some((v) => v.field === "organization_id"), JSON.stringify(many.fieldViolations));

    const category = await rejection(client.listProviders(org, "billing" as Category));
    assert.ok(category instanceof InvalidArgumentError, String(category));
    assert.deepEqual(category.fieldViolations.map((v) => v.field), ["category"]);

    const nothing = await rejection(client.saveIntegration(org, "stripe", {}));
    assert.ok(nothing instanceof InvalidArgumentError);
    assert.deepEqual(nothing.fieldViolations.map((v) => v.field), ["values"]);
  });

  test("NotFoundError names the resource: an unknown provider, missing credentials; allowMissing", async () => {
    const org = newOrg();
    const provider = await rejection(client.getConfig(org, "paypal"));
    assert.ok(provider instanceof NotFoundError);
    assert.equal(provider.code, "NOT_FOUND");
    assert.ok(provider.requestId);
    assert.equal(provider.resource?.resourceType, "integrations.v1.Provider");
    assert.equal(provider.resource?.resourceName, "paypal");
    assertJsonSafe(provider.toJSON());

    const missing = await rejection(client.deleteIntegration(org, "stripe"));
    assert.ok(missing instanceof NotFoundError);
    assert.equal(missing.resource?.resourceType, "integrations.v1.Integration");
    assert.equal(missing.resource?.resourceName, `organizations/${org}/integrations/stripe`);
    assert.equal(await client.deleteIntegration(org, "stripe", { allowMissing: true }), undefined);
  });

  test("deleteIntegration with a stale etag is refused; with the current one it removes the credentials", async () => {
    const org = newOrg();
    const first = await client.saveIntegration(org, "stripe", STRIPE);
    const second = await client.saveIntegration(org, "stripe", { secretKey: SK_2 });
    assert.ok((await rejection(client.deleteIntegration(org, "stripe", { etag: first.etag }))) instanceof ConflictError);
    await client.deleteIntegration(org, "stripe", { etag: second.etag });
    const after = await client.getConfig(org, "stripe");
    assert.equal(after.etag, "");
    assert.equal(after.values["secretKey"]?.source, "unset");
  });

  test("a request id chosen by the caller comes back on the error", async () => {
    const error = await rejection(client.getConfig(newOrg(), "paypal", { requestId: "req-ts-client-0001" }));
    assert.ok(error instanceof NotFoundError);
    assert.equal(error.requestId, "req-ts-client-0001");
    assert.match(String(error), /NOT_FOUND.*request id req-ts-client-0001/);
  });

  test("DataLossError for a stored value that cannot be decrypted", skipUnless(DATA_LOSS_ORG, "ITS_DATA_LOSS_ORG"), async () => {
    const error = await rejection(client.getConfig(DATA_LOSS_ORG, "stripe"));
    assert.ok(error instanceof DataLossError, String(error));
    assert.equal(error.code, "DATA_LOSS");
    assert.ok(error.requestId);
    assert.match(error.message, /secretKey/);
    assertJsonSafe(error.toJSON());
  });
});
