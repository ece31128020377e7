DROP TABLE login_failures;
DROP TABLE retired_refresh_tokens;
DROP TABLE sessions;
