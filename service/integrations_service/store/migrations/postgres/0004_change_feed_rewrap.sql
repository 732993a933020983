-- 0004: the change feed's payload says whether a change was a rotation's rewrap,
-- and every other change of a row's values moves its version.
--
-- A rotation (`rotate`, store.rewrap) re-encrypts a row's values under another
-- key: a new ciphertext, the same version, the same values. A row cache must
-- still drop the row (it holds ciphertext); a WatchConfigChanges consumer has
-- nothing to do (the etag did not change). The service marks its rewrap
-- transactions (`SET LOCAL integrations.rewrap = 'on'`, transaction-scoped),
-- and the payload carries "rewrap": true only for those.
--
-- Writers other than this service (the dashboard's own code on the adopted
-- table, a manual SQL fix) may change `config` without knowing about `version`.
-- Left alone, their change would keep the etag (which is derived from id and
-- version): etag checks would not see it, and a watching client that already
-- holds that etag would keep its value. So a BEFORE UPDATE trigger moves the
-- version of any update that changes `config` but not `version`, unless it is
-- a marked rewrap. The service always moves the version itself, so this never
-- touches its own saves.
--
-- Old payloads stay readable: a payload without "rewrap" (a notification sent
-- before this migration, or a hand-written one) is read as false, i.e. a
-- change that is sent to watchers: never a missed change, at most one too many.
-- Services from before this migration ignore the new key.

CREATE OR REPLACE FUNCTION integrations_config_is_rewrap() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('integrations.rewrap', true), '') = 'on'
$$;

CREATE OR REPLACE FUNCTION integrations_config_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version = OLD.version AND NEW.config IS DISTINCT FROM OLD.config
            AND NOT integrations_config_is_rewrap() THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS integrations_config_version ON integration_config;
CREATE TRIGGER integrations_config_version
    BEFORE UPDATE ON integration_config
    FOR EACH ROW EXECUTE FUNCTION integrations_config_version();

CREATE OR REPLACE FUNCTION integrations_config_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed integration_config;
    operation TEXT;
    moment TIMESTAMPTZ;
    rewrap BOOLEAN := FALSE;
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
        rewrap := TG_OP = 'UPDATE' AND NEW.version = OLD.version AND integrations_config_is_rewrap();
    END IF;
    payload := json_build_object(
        'operation', operation,
        'organization_id', changed.organization_id,
        'provider', changed.provider,
        'id', changed.id,
        'version', changed.version,
        'time', to_char(moment AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'rewrap', rewrap
    )::text;
    IF octet_length(payload) >= 8000 THEN
        payload := '{"operation": "reset", "reason": "undescribed"}';
    END IF;
    PERFORM pg_notify('integrations_config_changes', payload);
    RETURN NULL;
END
$$;
