WITH u AS (
    SELECT id FROM users
    WHERE id = $2 AND is_active AND password_changed_at = $5 FOR SHARE
)
INSERT INTO sessions (id, user_id, refresh_hash, refresh_expire_time, amr)
SELECT $1, u.id, $3, $4, $6 FROM u
