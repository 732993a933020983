-- 0001: the embedded store's integration_config table, the same shape as on PostgreSQL.
--
-- config holds the JSON object of field key to stored (encrypted) value, as TEXT.
-- Timestamps are TEXT in ISO-8601 UTC with microseconds
-- (2024-05-01T12:00:00.000001+00:00), so they sort as text and parse back exactly.

CREATE TABLE IF NOT EXISTS integration_config (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    config TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (organization_id, provider)
);
