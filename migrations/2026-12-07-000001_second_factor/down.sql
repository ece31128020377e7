DROP TRIGGER totp_factors_disabled ON totp_factors;
DROP TRIGGER totp_factors_enabled ON totp_factors;
DROP FUNCTION identity_totp_changed();
ALTER TABLE sessions DROP COLUMN amr;
DROP TABLE mfa_challenges;
DROP TABLE recovery_codes;
DROP TABLE totp_factors;
