WITH rotated AS (
    UPDATE sessions s SET refresh_hash = $2, refresh_expire_time = $3, refresh_time = now()
    FROM users u
    WHERE s.refresh_hash = $1 AND s.end_time IS NULL AND s.refresh_expire_time > now()
      AND u.id = s.user_id AND u.is_active
    RETURNING s.id, s.user_id, s.amr
), retired AS (
    INSERT INTO retired_refresh_tokens (hash, session_id) SELECT $1, id FROM rotated
), forgotten AS (
    DELETE FROM retired_refresh_tokens r USING rotated
    WHERE r.session_id = rotated.id AND r.hash IN (
        SELECT o.hash FROM retired_refresh_tokens o
        WHERE o.session_id = rotated.id
        ORDER BY o.retire_time DESC, o.hash OFFSET $4 - 1)
)
SELECT id, user_id, amr FROM rotated
