-- A second factor: TOTP (RFC 6238) with recovery codes (API.md, "Second
-- factor: TOTP"), and how each session was authenticated (RFC 8176 amr).
--
-- A TOTP secret is stored sealed (AES-256-GCM with the key of MFA_KEY_FILE,
-- the user's id as associated data), never in the clear. A recovery code,
-- and a login's second-step challenge, are stored as SHA-256 only: they are
-- random (50 and 256 bits), shown once.

-- One factor per user: pending (enrolment begun, awaiting its first code,
-- until pending_expire_time) or on (confirm_time set).
CREATE TABLE totp_factors (
    user_id             uuid        PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    secret              bytea       NOT NULL,
    pending_expire_time timestamptz,
    confirm_time        timestamptz,
    -- The last time step whose code was accepted: a code is accepted once,
    -- and none older after it.
    last_used_step      bigint,
    create_time         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT totp_factors_pending_or_on CHECK ((pending_expire_time IS NULL) <> (confirm_time IS NULL))
);

-- The ten single-use codes given when TOTP is turned on.
CREATE TABLE recovery_codes (
    user_id   uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash bytea       NOT NULL,
    use_time  timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- A login whose password matched, waiting for its second factor
-- (CompleteLogin): single use, five minutes. The password it checked must
-- still be the user's when it completes.
CREATE TABLE mfa_challenges (
    challenge_hash      bytea       PRIMARY KEY,
    user_id             uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    password_changed_at timestamptz NOT NULL,
    expire_time         timestamptz NOT NULL
);
CREATE INDEX mfa_challenges_expire_time ON mfa_challenges (expire_time);
CREATE INDEX mfa_challenges_user_id ON mfa_challenges (user_id);

-- How a session was authenticated: '{pwd}', '{pwd,otp}', '{pwd,rcode}';
-- empty for an API key's (ExchangeApiKey). Its access tokens say so (amr).
ALTER TABLE sessions ADD COLUMN amr text[] NOT NULL DEFAULT '{pwd}';
UPDATE sessions SET amr = '{}' WHERE api_key_id IS NOT NULL;

-- MFA_ENABLED (14) when a factor is turned on; MFA_DISABLED (15) when one
-- that was on is removed (DisableTotp, ResetSecondFactor), but not when its
-- user is deleted (USER_DELETED says it all).
CREATE FUNCTION identity_totp_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM users WHERE id = OLD.user_id) THEN
            PERFORM identity_record_change(15::smallint, OLD.user_id, NULL, NULL);
        END IF;
    ELSE
        PERFORM identity_record_change(14::smallint, NEW.user_id, NULL, NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER totp_factors_enabled AFTER UPDATE OF confirm_time ON totp_factors
    FOR EACH ROW WHEN (OLD.confirm_time IS NULL AND NEW.confirm_time IS NOT NULL)
    EXECUTE FUNCTION identity_totp_changed();
CREATE TRIGGER totp_factors_disabled AFTER DELETE ON totp_factors
    FOR EACH ROW WHEN (OLD.confirm_time IS NOT NULL)
    EXECUTE FUNCTION identity_totp_changed();
