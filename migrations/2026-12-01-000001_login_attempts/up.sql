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
