-- 0001: the dashboard's integration_config table, plus a row version.
--
-- The table may already exist: the merchant dashboard created it (with nullable
-- timestamps and no version). IF NOT EXISTS adopts that table and its rows as
-- they are; the statements after it bring both shapes to the same schema.

CREATE TABLE IF NOT EXISTS integration_config (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    config JSONB NOT NULL,
    created_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ,
    UNIQUE (organization_id, provider)
);

-- Grows with every write; existing dashboard rows start at 1.
ALTER TABLE integration_config ADD COLUMN IF NOT EXISTS version BIGINT NOT NULL DEFAULT 1;

-- Dashboard rows may lack timestamps; the service reports them, so fill them in.
UPDATE integration_config SET created_at = COALESCE(updated_at, now()) WHERE created_at IS NULL;
UPDATE integration_config SET updated_at = created_at WHERE updated_at IS NULL;

ALTER TABLE integration_config
    ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN created_at SET NOT NULL,
    ALTER COLUMN updated_at SET DEFAULT now(),
    ALTER COLUMN updated_at SET NOT NULL;
