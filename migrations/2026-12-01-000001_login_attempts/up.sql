-- Password checks under way, one row each: a lease taken before a password
-- is checked and given back when the check ends (success, failure, or no
-- verdict at all: cancelled, timed out, a database blip). The throttle lets
-- an attempt check a password only while the failures so far plus the
-- checks under way stay below the free budget, so parallel guesses cannot
-- slip past the lock, while parallel correct logins wait their turn instead
-- of being counted as failures. A lease outlives a crashed replica only
-- until `expire_time`.
CREATE TABLE login_attempts (
    id          uuid        PRIMARY KEY,
    key         text        NOT NULL,
    expire_time timestamptz NOT NULL
);

CREATE INDEX login_attempts_key ON login_attempts (key, expire_time);

-- Keeping the newest retired refresh tokens of a session asks for them in
-- order.
CREATE INDEX retired_refresh_tokens_session_time
    ON retired_refresh_tokens (session_id, retire_time DESC);
DROP INDEX retired_refresh_tokens_session_id;

-- Claims a lease on `p_key` for a password check, in one round trip: the
-- key's row is locked first (an upsert), so concurrent claims on one key
-- are serialised, and each later statement of this function runs on a new
-- snapshot (PL/pgSQL, READ COMMITTED) that sees the leases the claims
-- before it committed. Grants the lease when the key is not locked and the
-- failures so far plus the checks under way leave room: fewer than
-- `p_free` in all, or, once `p_free` failures are reached, one check at a
-- time between locks. Failures more than a day old are forgotten here.
-- Returns whether the lease was granted, and the lock met, if any.
CREATE FUNCTION identity_claim_login(
    p_key text, p_lease uuid, p_free integer, p_lease_secs double precision
) RETURNS TABLE (granted boolean, locked_until timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_failures integer;
    v_locked   timestamptz;
    v_checking bigint;
BEGIN
    INSERT INTO login_failures AS f (key, failures, locked_until, update_time)
    VALUES (p_key, 0, NULL, now())
    ON CONFLICT (key) DO UPDATE SET failures = CASE
        WHEN f.update_time < now() - interval '1 day'
             AND NOT COALESCE(f.locked_until > now(), false) THEN 0
        ELSE f.failures END
    RETURNING f.failures, CASE WHEN f.locked_until > now() THEN f.locked_until END
    INTO v_failures, v_locked;
    IF v_locked IS NOT NULL THEN
        RETURN QUERY SELECT false, v_locked;
        RETURN;
    END IF;
    SELECT count(*) INTO v_checking FROM login_attempts a
    WHERE a.key = p_key AND a.expire_time > now();
    IF v_checking >= GREATEST(p_free - v_failures, 1) THEN
        RETURN QUERY SELECT false, NULL::timestamptz;
        RETURN;
    END IF;
    INSERT INTO login_attempts (id, key, expire_time)
    VALUES (p_lease, p_key, now() + make_interval(secs => p_lease_secs));
    RETURN QUERY SELECT true, NULL::timestamptz;
END
$$;
