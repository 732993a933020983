-- 0004: the change feed's payload says whether a save kept the version.
--
-- A rotation (`rotate`, store.rewrap) re-encrypts a row's values under another
-- key: a new ciphertext, the same version, the same values. A row cache must
-- still drop the row (it holds ciphertext); a WatchConfigChanges consumer has
-- nothing to do (the etag did not change). The payload of 0003 could not tell
-- the two apart; from here a save carries "rewrap": true when
-- an UPDATE kept the version, false otherwise.
--
-- Old payloads stay readable: a payload without "rewrap" (a notification sent
-- before this migration, or a hand-written one) is read as false, i.e. a
-- change that is sent to watchers: never a missed change, at most one too many.
-- Services from before this migration ignore the new key.
--
-- Any writer that changes values must bump version (this service always does):
-- the etag is derived from id and version, so a value change under the same
-- version would escape the service's own etag checks as well as watchers.

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
        rewrap := TG_OP = 'UPDATE' AND NEW.version = OLD.version;
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
