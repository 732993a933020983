-- 0005: a save of an existing row in one statement, its own transaction (store/postgres.py, the
-- optimistic save).
--
-- integrations_save_if_unchanged writes p_config to the row only if the row is still the version the
-- service read: same id, same version, same xmin (the transaction that wrote that version of the row,
-- so any writer's change counts, even `rotate`'s, which leaves version alone; 0004 moves the version of
-- every other writer's change). When it writes, it appends the audit record in the same transaction, and the
-- change-feed trigger (0003) notifies as for any update. When it does not, it writes nothing and
-- returns the row as stored now (no row when there is none), for the caller's next try.
--
-- It runs without BEGIN/COMMIT, in one round trip, so it bounds its own lock waits: lock_timeout is
-- set first, for this transaction only (set_config(..., true)), to what is left of the call's
-- budget. PL/pgSQL takes the locks of a statement only when it runs it, so the wait for the table
-- (a migration, LOCK TABLE) and for the row (another writer) both end in time, and a save whose
-- call has given up can never commit later on its own.

CREATE OR REPLACE FUNCTION integrations_save_if_unchanged(
    p_organization_id TEXT,
    p_provider TEXT,
    p_id TEXT,
    p_version BIGINT,
    p_xmin XID,
    p_config JSONB,
    p_lock_timeout_ms INTEGER,
    p_audit BOOLEAN,
    a_time TIMESTAMPTZ,
    a_caller TEXT,
    a_rpc TEXT,
    a_outcome TEXT,
    a_organization_id TEXT,
    a_provider TEXT,
    a_fields JSONB,
    a_request_id TEXT,
    a_details JSONB
) RETURNS TABLE (
    written BOOLEAN,
    id TEXT,
    organization_id TEXT,
    provider TEXT,
    config JSONB,
    version BIGINT,
    created_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ,
    row_xmin XID
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('lock_timeout', greatest(p_lock_timeout_ms, 1) || 'ms', true);
    -- GREATEST: updated_at grows with every write even if the clock stalls or steps back.
    RETURN QUERY
        UPDATE integration_config AS t
        SET config = p_config,
            version = t.version + 1,
            updated_at = GREATEST(clock_timestamp(), t.updated_at + interval '1 microsecond')
        WHERE t.id = p_id AND t.version = p_version AND t.xmin = p_xmin
        RETURNING true, t.id, t.organization_id, t.provider, t.config, t.version, t.created_at, t.updated_at,
            t.xmin;
    IF FOUND THEN
        IF p_audit THEN
            INSERT INTO audit_events (time, caller, rpc, outcome, organization_id, provider, fields, request_id, details)
            VALUES (a_time, a_caller, a_rpc, a_outcome, a_organization_id, a_provider, a_fields, a_request_id,
                a_details);
        END IF;
        RETURN;
    END IF;
    -- Not written: the row as stored now (a statement of its own, so its snapshot is taken after the
    -- update gave up, and includes the write that made it give up).
    RETURN QUERY
        SELECT false, t.id, t.organization_id, t.provider, t.config, t.version, t.created_at, t.updated_at, t.xmin
        FROM integration_config AS t
        WHERE t.organization_id = p_organization_id AND t.provider = p_provider;
END
$$;
