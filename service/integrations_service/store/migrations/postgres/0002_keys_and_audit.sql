-- 0002: the encryption key ledger and the audit trail.
--
-- encryption_keys never holds a key: only its check value (so a replica started
-- with a different key under the same id is caught) and how many values it has
-- encrypted (the NIST SP 800-38D nonce budget of a random-nonce AES-GCM key).
-- A key is retired (retired_at set) once no row needs it to be read.

CREATE TABLE encryption_keys (
    key_id TEXT PRIMARY KEY,
    check_value TEXT NOT NULL,
    encryptions BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    retired_at TIMESTAMPTZ NULL
);

-- Append-only. Never a credential value: at most keyed HMAC fingerprints in details.
-- fields is a JSON array of field keys, details a JSON object of string to string.
CREATE TABLE audit_events (
    id BIGSERIAL PRIMARY KEY,
    time TIMESTAMPTZ NOT NULL,
    caller TEXT NOT NULL,
    rpc TEXT NOT NULL,
    outcome TEXT NOT NULL,
    organization_id TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    fields JSONB NOT NULL DEFAULT '[]'::jsonb,
    request_id TEXT NOT NULL DEFAULT '',
    details JSONB NOT NULL DEFAULT '{}'::jsonb
);

-- One organization's trail, newest first.
CREATE INDEX audit_events_organization_id_id ON audit_events (organization_id, id);

-- Rotation scans integration_config in byte order of id (the same order as the
-- SQLite store and Python's sorted()), which the primary key's index only
-- serves when the database's collation is "C".
CREATE INDEX integration_config_id_bytes ON integration_config (id COLLATE "C");
