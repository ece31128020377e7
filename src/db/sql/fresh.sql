SELECT u.id, u.username, u.email, u.first_name, u.last_name, u.is_superuser,
    u.is_active, u.is_verified, u.attributes, u.create_time, u.update_time, u.is_service,
    u.password_changed_at,
    (s.id IS NOT NULL AND s.end_time IS NULL AND s.refresh_expire_time > now())
        AS session_live,
    (s.id IS NOT NULL AND s.end_time IS NULL) AS session_open,
    s.refresh_expire_time AS session_expire_time,
    g.group_ids, g.groupnames, g.slugs, g.group_times
FROM users u
LEFT JOIN sessions s ON s.id = $2 AND s.user_id = u.id
LEFT JOIN LATERAL (
    SELECT array_agg(gr.id ORDER BY gr.id) AS group_ids,
           array_agg(gr.groupname ORDER BY gr.id) AS groupnames,
           array_agg(gr.slug ORDER BY gr.id) AS slugs,
           array_agg(gr.create_time ORDER BY gr.id) AS group_times
    FROM group_members gm JOIN groups gr ON gr.id = gm.group_id
    WHERE gm.user_id = u.id
) g ON true
WHERE u.id = $1
