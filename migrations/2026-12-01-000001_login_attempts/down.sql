DROP FUNCTION identity_claim_login(text, uuid, integer, double precision);
CREATE INDEX retired_refresh_tokens_session_id ON retired_refresh_tokens (session_id);
DROP INDEX retired_refresh_tokens_session_time;
DROP TABLE login_attempts;
