DROP TRIGGER api_keys_revoked ON api_keys;
DROP TRIGGER api_keys_created ON api_keys;
DROP FUNCTION identity_api_keys_changed();
DROP INDEX sessions_api_key_id;
ALTER TABLE sessions DROP COLUMN api_key_id;
DROP TABLE api_keys;
ALTER TABLE users DROP COLUMN is_service;
