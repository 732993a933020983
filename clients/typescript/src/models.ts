/**
 * The facade's results: plain, JSON-safe objects (strings, booleans, numbers, arrays, records;
 * no bigint, no protobuf message classes, timestamps as ISO 8601 strings), so a Next.js server
 * action can return them to the browser as they are.
 */

import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { DescEnum } from "@bufbuild/protobuf";

import * as pb from "./gen/integrations/v1/integrations_pb.js";

export type Category = "payments" | "notifications" | "analytics";
export type ValueSource = "organization" | "environment" | "unset";
/** What a committed change did: `"saved"` (created or updated, by any writer) or `"deleted"`. */
export type ChangeType = "saved" | "deleted";

/**
 * One configurable field of a provider: every field of `integrations.v1.ProviderField` under its
 * generated (camelCase) name, e.g. `{ key: "secretKey", envVar: "STRIPE_SECRET_KEY", secret: true, ... }`.
 * Derived from the generated code, so a field added to the proto shows up after `make ts-gen`.
 */
export type ProviderField = Omit<pb.ProviderField, "$typeName" | "$unknown">;

export interface Provider {
  id: string;
  displayName: string;
  category: Category;
  /** False for providers the commerce service has no runtime client for yet (UI only). */
  runtimeSupported: boolean;
  /** In the order the dashboard form shows them. */
  fields: ProviderField[];
  /** Only with an organization id: it has stored credentials for this provider. */
  configured: boolean;
  /** Only with an organization id: every required field resolves (organization or environment). */
  ready: boolean;
}

export interface ConfigValue {
  /**
   * Clear text, or for secrets in the masked view masked text: "••••••••4242" for the organization's own,
   * "••••••••" alone for the environment's (the platform's); "" when unset.
   */
  value: string;
  source: ValueSource;
  secret: boolean;
}

export interface ProviderConfig {
  organizationId: string;
  provider: string;
  /** Every field of the provider, keyed by field key. */
  values: Record<string, ConfigValue>;
  /** Send it back to saveIntegration/deleteIntegration to refuse a concurrent change; "" when nothing is stored. */
  etag: string;
  /** When the stored credentials last changed (ISO 8601, millisecond precision); null when none are stored. */
  updateTime: string | null;
}

/** The first event of every watch stream: from now on no committed change in its scope is missed while it stays open. */
export interface WatchStartedEvent {
  kind: "started";
  /** When the subscription became live (the service's clock, ISO 8601). */
  time: string | null;
}

/**
 * One committed change of one organization's stored credentials for one provider. It never holds
 * a value, masked or not: identifiers, an etag, a type and a time.
 */
export interface ConfigChangedEvent {
  kind: "changed";
  organizationId: string;
  provider: string;
  /** The etag getConfig answers after the change ("" after a delete): holding it means already having the change. */
  etag: string;
  type: ChangeType;
  /** When it was committed (ISO 8601; for a save, the credentials' updateTime). */
  time: string | null;
}

/** Changes may have been missed (this consumer fell behind, or an undescribed change): rebuild everything; the stream goes on. */
export interface WatchResyncEvent {
  kind: "resync";
  /** For logs: "fell_behind", "truncated" or "undescribed". */
  reason: string;
}

export type WatchEvent = WatchStartedEvent | ConfigChangedEvent | WatchResyncEvent;

/** The character the service masks secrets with; a value containing it is a masked value sent back. */
export const MASK_CHARACTER = "•";

function enumNames<T extends string>(schema: DescEnum, prefix: string): Map<number, T> {
  return new Map(schema.values.map((value) => [value.number, value.name.slice(prefix.length).toLowerCase() as T]));
}

const CATEGORY_NAMES = enumNames<Category>(pb.CategorySchema, "CATEGORY_");
const SOURCE_NAMES = enumNames<ValueSource>(pb.ValueSourceSchema, "VALUE_SOURCE_");
const CHANGE_TYPE_NAMES = enumNames<ChangeType>(pb.ChangeTypeSchema, "CHANGE_TYPE_");

function enumName<T extends string>(names: Map<number, T>, value: number): T {
  // An enum number newer than this client's generated code: say so rather than guess.
  return names.get(value) ?? (`unknown_${value}` as T);
}

export function categoryNumber(category: Category): pb.Category {
  for (const [number, name] of CATEGORY_NAMES) if (name === category && number !== 0) return number;
  // Sent as is: the service answers INVALID_ARGUMENT naming `category`.
  return -1 as pb.Category;
}

/** Copies every field of a ProviderField; refuses a kind of field that would not be JSON-safe. */
function plainField(field: pb.ProviderField): ProviderField {
  const plain: Record<string, unknown> = {};
  for (const member of pb.ProviderFieldSchema.fields) {
    const value: unknown = (field as unknown as Record<string, unknown>)[member.localName];
    const safe = (item: unknown): boolean => ["string", "boolean", "number"].includes(typeof item);
    if (!(safe(value) || (Array.isArray(value) && value.every(safe)))) {
      throw new TypeError(`ProviderField.${member.localName}: ${member.fieldKind} fields are not mapped by the facade`);
    }
    plain[member.localName] = Array.isArray(value) ? [...value] : value;
  }
  return plain as ProviderField;
}

export function plainProvider(provider: pb.Provider): Provider {
  return {
    id: provider.id,
    displayName: provider.displayName,
    category: enumName(CATEGORY_NAMES, provider.category),
    runtimeSupported: provider.runtimeSupported,
    fields: provider.fields.map(plainField),
    configured: provider.configured,
    ready: provider.ready,
  };
}

export function plainConfig(config: pb.ProviderConfig | undefined): ProviderConfig {
  if (config === undefined) throw new TypeError("the service answered without a config");
  const values: Record<string, ConfigValue> = {};
  for (const [key, value] of Object.entries(config.values)) {
    Object.defineProperty(values, key, {
      value: { value: value.value, source: enumName(SOURCE_NAMES, value.source), secret: value.secret },
      enumerable: true,
      writable: true,
      configurable: true,
    });
  }
  return {
    organizationId: config.organizationId,
    provider: config.provider,
    values,
    etag: config.etag,
    updateTime: isoTime(config.updateTime),
  };
}

function isoTime(timestamp: Timestamp | undefined): string | null {
  return timestamp ? timestampDate(timestamp).toISOString() : null;
}

/** The event one WatchConfigChanges message carries; undefined for a kind of message newer than this client. */
export function plainWatchEvent(reply: pb.WatchConfigChangesResponse): WatchEvent | undefined {
  const { event } = reply;
  switch (event.case) {
    case "started":
      return { kind: "started", time: isoTime(event.value.startTime) };
    case "change": {
      const change = event.value;
      return {
        kind: "changed",
        organizationId: change.organizationId,
        provider: change.provider,
        etag: change.etag,
        type: enumName(CHANGE_TYPE_NAMES, change.type),
        time: isoTime(change.changeTime),
      };
    }
    case "resync":
      return { kind: "resync", reason: event.value.reason };
    default:
      return undefined;
  }
}

/**
 * `values` without the entries that hold a masked value ("••••••••4242" posted back by a form):
 * the service refuses them, and leaving a field out keeps its stored secret.
 */
export function withoutMaskedValues(values: Readonly<Record<string, string>>): {
  values: Record<string, string>;
  dropped: string[];
} {
  const kept: Record<string, string> = {};
  const dropped: string[] = [];
  for (const [key, value] of Object.entries(values)) {
    if (typeof value === "string" && value.includes(MASK_CHARACTER)) dropped.push(key);
    else Object.defineProperty(kept, key, { value, enumerable: true, writable: true, configurable: true });
  }
  return { values: kept, dropped };
}
