-- 0003: the change feed. Every committed change of integration_config notifies
-- channel integrations_config_changes (store/changes.py: CHANGE_CHANNEL), whoever
-- writes: this service's replicas, `rotate`, the dashboard, a manual SQL fix.
--
-- pg_notify runs in the writing transaction: PostgreSQL delivers the
-- notification when that transaction commits, in commit order, and never when
-- it rolls back. Listeners get it on the primary only.
--
-- Payload (JSON): {"operation": "saved"|"deleted", "organization_id", "provider",
-- "id", "version", "time"} (time: UTC, the row's updated_at for a save, the
-- moment of the delete for a delete), or {"operation": "reset", "reason": ...}
-- meaning "anything may have changed": after TRUNCATE, and instead of a payload
-- over pg_notify's 8000-byte limit (the write itself must not fail over it).
-- Never a value: only which row changed.

CREATE OR REPLACE FUNCTION integrations_config_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed integration_config;
    operation TEXT;
    moment TIMESTAMPTZ;
    payload TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
        operation := 'deleted';
        moment := clock_timestamp();
    ELSE
        changed := NEW;
        operation := 'saved';
        moment := NEW.updated_at;
    END IF;
    payload := json_build_object(
        'operation', operation,
        'organization_id', changed.organization_id,
        'provider', changed.provider,
        'id', changed.id,
        'version', changed.version,
        'time', to_char(moment AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    )::text;
    IF octet_length(payload) >= 8000 THEN
        payload := '{"operation": "reset", "reason": "undescribed"}';
    END IF;
    PERFORM pg_notify('integrations_config_changes', payload);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION integrations_config_notify_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('integrations_config_changes', '{"operation": "reset", "reason": "truncated"}');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS integrations_config_changed ON integration_config;
CREATE TRIGGER integrations_config_changed
    AFTER INSERT OR UPDATE OR DELETE ON integration_config
    FOR EACH ROW EXECUTE FUNCTION integrations_config_notify();

DROP TRIGGER IF EXISTS integrations_config_truncated ON integration_config;
CREATE TRIGGER integrations_config_truncated
    AFTER TRUNCATE ON integration_config
    FOR EACH STATEMENT EXECUTE FUNCTION integrations_config_notify_truncate();
