-- Service accounts and API keys (API.md, "Service accounts and API keys").
--
-- A service account is a user with is_service: created without a password
-- (its password_hash holds "!", which no password matches), it never logs
-- in. Its credentials are API keys.
--
-- A key's secret is never stored: only its SHA-256 (a secret of 256 random
-- bits needs no slow hash), compared in constant time after the key is
-- found by its prefix (the first characters of the secret, shown to people,
-- unique). Keys are never edited: only revoked, and their last use noted
-- (at most once a minute, and no change of the feed).

ALTER TABLE users ADD COLUMN is_service boolean NOT NULL DEFAULT false;

CREATE TABLE api_keys (
    id              uuid        PRIMARY KEY,
    user_id         uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    display_name    text        NOT NULL DEFAULT '',
    prefix          text        NOT NULL,
    secret_hash     bytea       NOT NULL,
    allowed_methods text[]      NOT NULL DEFAULT '{}',
    create_time     timestamptz NOT NULL DEFAULT now(),
    expire_time     timestamptz,
    last_use_time   timestamptz,
    revoke_time     timestamptz,
    CONSTRAINT api_keys_prefix_key UNIQUE (prefix)
);

CREATE INDEX api_keys_user_id ON api_keys (user_id, id);

-- The session an ExchangeApiKey token belongs to names its key, and ends
-- when the key is revoked.
ALTER TABLE sessions ADD COLUMN api_key_id uuid REFERENCES api_keys (id) ON DELETE CASCADE;
CREATE INDEX sessions_api_key_id ON sessions (api_key_id) WHERE api_key_id IS NOT NULL;

-- API_KEY_CREATED (11), API_KEY_REVOKED (12), with the key's id.
CREATE FUNCTION identity_api_keys_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (kind, user_id, api_key_id, actor_id, rpc, request_id)
    VALUES (CASE WHEN TG_OP = 'INSERT' THEN 11 ELSE 12 END, NEW.user_id, NEW.id,
            NULLIF(current_setting('identity.actor_id', true), '')::uuid,
            COALESCE(current_setting('identity.rpc', true), ''),
            COALESCE(current_setting('identity.request_id', true), ''));
    IF current_setting('identity.announce', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('identity_changes', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_created AFTER INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION identity_api_keys_changed();
-- Only a revocation is a change (a last use is not).
CREATE TRIGGER api_keys_revoked AFTER UPDATE OF revoke_time ON api_keys
    FOR EACH ROW WHEN (OLD.revoke_time IS NULL AND NEW.revoke_time IS NOT NULL)
    EXECUTE FUNCTION identity_api_keys_changed();
