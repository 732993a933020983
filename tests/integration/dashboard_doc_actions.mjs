// Run by tests/integration/test_typescript_client.py: docs/dashboard.md's server actions, compiled,
// called the way its form calls them, against a real service.
import assert from "node:assert/strict";
import { revalidated } from "next/cache";
import { deleteIntegration, saveIntegration } from "./out/app/(dashboard)/integrations/actions.js";

const SK = "sk_test_51HxDashboardDocAction4242", PK = "pk_test_51HxDashboardDocAction01";
const ok = (result) => {
  assert.deepEqual(JSON.parse(JSON.stringify(result)), result, "JSON-safe");
  assert.equal(result.ok, true, JSON.stringify(result));
  return result.config;
};
const failed = (result) => {
  assert.deepEqual(JSON.parse(JSON.stringify(result)), result, "JSON-safe");
  assert.equal(result.ok, false, JSON.stringify(result));
  assert.ok(result.error.requestId);
  return result.error;
};

// First save from an empty form: blank fields are left out.
const first = ok(await saveIntegration("stripe", { secretKey: SK, webhookSecret: "" }, { etag: "" }));
assert.equal(first.values.secretKey.value, "••••••••4242");
assert.equal(first.values.webhookSecret.source, "environment");
assert.deepEqual(revalidated, ["/integrations"]);

// The form posted back as rendered (masked secrets, blank unset fields), one field filled in: the secret stays.
const form = Object.fromEntries(Object.entries(first.values).map(([key, value]) => [key, value.value]));
assert.equal(form.secretKey, "••••••••4242");
const second = ok(await saveIntegration("stripe", { ...form, publishableKey: "pk_test_51HxDashboardDocAction02" }, { etag: first.etag }));
assert.equal(second.values.secretKey.value, "••••••••4242");
assert.equal(second.values.publishableKey.value, "pk_test_51HxDashboardDocAction02");

// A save over a newer change, a bad value, an unknown provider.
const stale = failed(await saveIntegration("stripe", { publishableKey: PK }, { etag: first.etag }));
assert.equal(stale.conflict, true);
const bad = failed(await saveIntegration("stripe", { secretKey: "pk_test_notASecretKey01" }, { etag: second.etag }));
assert.deepEqual(Object.keys(bad.fieldErrors), ["secretKey"]);
assert.equal(bad.conflict, false);
assert.ok(!JSON.stringify(bad).includes("notASecretKey"));
assert.equal(failed(await saveIntegration("paypal", { apiKey: "x" }, { etag: "" })).message, "This provider does not exist.");

// Hostile arguments from the browser: non-strings are ignored, a value both set and cleared is cleared.
const cleared = ok(await saveIntegration("stripe", { publishableKey: PK, secretKey: 42 }, { etag: second.etag, clearFields: ["publishableKey"] }));
assert.equal(cleared.values.publishableKey.source, "unset");
assert.equal(cleared.values.secretKey.value, "••••••••4242");

const removed = ok(await deleteIntegration("stripe", cleared.etag));
assert.equal(removed.etag, "");
assert.equal(removed.values.secretKey.source, "unset");
console.log("dashboard doc actions: ok");
