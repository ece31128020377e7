-- Sessions, refresh tokens and failed-login throttling. Refresh tokens are
-- stored only as SHA-256 hashes (they are 256 random bits: no salt or slow
-- hash is needed). A rotated token's hash moves to retired_refresh_tokens, so
-- that presenting it again is recognised as reuse and ends its session.

CREATE TABLE sessions (
    id                  uuid        PRIMARY KEY,
    user_id             uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    refresh_hash        bytea       NOT NULL,
    refresh_expire_time timestamptz NOT NULL,
    create_time         timestamptz NOT NULL DEFAULT now(),
    refresh_time        timestamptz NOT NULL DEFAULT now(),
    end_time            timestamptz,
    end_reason          text,
    CONSTRAINT sessions_refresh_hash_key UNIQUE (refresh_hash)
);

CREATE INDEX sessions_user_id_live ON sessions (user_id) WHERE end_time IS NULL;

CREATE TABLE retired_refresh_tokens (
    hash        bytea       PRIMARY KEY,
    session_id  uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    retire_time timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX retired_refresh_tokens_session_id ON retired_refresh_tokens (session_id);

-- One row per throttled key: 'user:<id>' when a login names an account,
-- 'login:<sha-256 of the canonical login>' when it names none. Every attempt
-- is counted before its password is checked (so parallel attempts cannot
-- slip past the lock); a success deletes the row. `refused` says whether the
-- last attempt met a lock.
CREATE TABLE login_failures (
    key          text        PRIMARY KEY,
    failures     integer     NOT NULL,
    locked_until timestamptz,
    refused      boolean     NOT NULL DEFAULT false,
    update_time  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX login_failures_update_time ON login_failures (update_time);
