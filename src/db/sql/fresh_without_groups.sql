SELECT u.id, u.username, u.email, u.first_name, u.last_name, u.is_superuser,
    u.is_active, u.is_verified, u.attributes, u.create_time, u.update_time, u.is_service,
    u.password_changed_at,
    (s.id IS NOT NULL AND s.end_time IS NULL AND s.refresh_expire_time > now())
        AS session_live,
    (s.id IS NOT NULL AND s.end_time IS NULL) AS session_open,
    s.refresh_expire_time AS session_expire_time,
    NULL::uuid[] AS group_ids, NULL::text[] AS groupnames, NULL::text[] AS slugs,
    NULL::timestamptz[] AS group_times
FROM users u
LEFT JOIN sessions s ON s.id = $2 AND s.user_id = u.id
WHERE u.id = $1
