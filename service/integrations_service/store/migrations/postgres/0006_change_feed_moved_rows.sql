-- 0006: an update that moves a row to another organization or provider notifies its old key too.
--
-- The service never changes a row's key, but a manual SQL fix may (a row filed
-- under the wrong organization, a provider renamed). The trigger of 0003/0004
-- notified the row as it is now, so the old key was never invalidated: a row
-- cache kept serving the row under the organization it had left (until its
-- TTL), and a watcher of that organization never heard it was gone. Now such
-- an update sends, first, a "deleted" for the row as it was (its old key, id
-- and version; the moment of the update), then the "saved" of the row as it
-- is, as any update does. An update that keeps the key notifies once, as before.
--
-- The payloads are those of 0004; each one over pg_notify's limit is replaced
-- by a reset, as before.

-- Plain arguments, cast (the adopted table may type its columns otherwise), not the table's row type: a
-- function taking that type would depend on the table (the dashboard's) and stand in the way of its DROP.
CREATE OR REPLACE FUNCTION integrations_config_payload(
    operation TEXT, organization_id TEXT, provider TEXT, id TEXT, version BIGINT, moment TIMESTAMPTZ,
    rewrap BOOLEAN
) RETURNS TEXT
LANGUAGE plpgsql STABLE AS $$
DECLARE
    payload TEXT;
BEGIN
    payload := json_build_object(
        'operation', operation,
        'organization_id', organization_id,
        'provider', provider,
        'id', id,
        'version', version,
        'time', to_char(moment AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'rewrap', rewrap
    )::text;
    IF octet_length(payload) >= 8000 THEN
        RETURN '{"operation": "reset", "reason": "undescribed"}';
    END IF;
    RETURN payload;
END
$$;

CREATE OR REPLACE FUNCTION integrations_config_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('integrations_config_changes', integrations_config_payload(
            'deleted', OLD.organization_id::text, OLD.provider::text, OLD.id::text, OLD.version::bigint,
            clock_timestamp(), FALSE));
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.organization_id IS DISTINCT FROM OLD.organization_id
            OR NEW.provider IS DISTINCT FROM OLD.provider) THEN
        PERFORM pg_notify('integrations_config_changes', integrations_config_payload(
            'deleted', OLD.organization_id::text, OLD.provider::text, OLD.id::text, OLD.version::bigint,
            clock_timestamp(), FALSE));
    END IF;
    PERFORM pg_notify('integrations_config_changes', integrations_config_payload(
        'saved', NEW.organization_id::text, NEW.provider::text, NEW.id::text, NEW.version::bigint, NEW.updated_at,
        TG_OP = 'UPDATE' AND NEW.version = OLD.version AND integrations_config_is_rewrap()));
    RETURN NULL;
END
$$;
