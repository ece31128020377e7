-- Single-use tokens of the account lifecycle: email verification and
-- password reset. Like refresh tokens they are 256 random bits, stored only
-- as SHA-256 hashes. A token is bound to its purpose, its user and the
-- canonical email it was issued for; `use_time` marks it spent.

CREATE TABLE account_tokens (
    hash            bytea       PRIMARY KEY,
    purpose         text        NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    user_id         uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email_canonical text        NOT NULL,
    expire_time     timestamptz NOT NULL,
    use_time        timestamptz,
    create_time     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX account_tokens_user_id ON account_tokens (user_id);
CREATE INDEX account_tokens_expire_time ON account_tokens (expire_time);
