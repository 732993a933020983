-- 0002: the encryption key ledger and the audit trail, the same shape as on PostgreSQL.
--
-- Timestamps are TEXT in ISO-8601 UTC with microseconds, as in 0001. fields is
-- the JSON array of field keys, details the JSON object of string to string, as TEXT.
-- AUTOINCREMENT: audit ids are never reused, even after the newest rows are deleted.

CREATE TABLE encryption_keys (
    key_id TEXT NOT NULL PRIMARY KEY,
    check_value TEXT NOT NULL,
    encryptions INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')),
    retired_at TEXT NULL
);

CREATE TABLE audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    caller TEXT NOT NULL,
    rpc TEXT NOT NULL,
    outcome TEXT NOT NULL,
    organization_id TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    fields TEXT NOT NULL DEFAULT '[]',
    request_id TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_events_organization_id_id ON audit_events (organization_id, id);
