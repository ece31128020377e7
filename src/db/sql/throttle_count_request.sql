INSERT INTO login_failures AS f (key, failures, locked_until, refused, update_time)
VALUES ($1, 1, CASE WHEN 1 >= $2 THEN now() + interval '1 second' END, false, now())
ON CONFLICT (key) DO UPDATE SET
    failures = CASE WHEN f.locked_until > now() THEN f.failures
                    WHEN f.update_time < now() - interval '1 day' THEN 1
                    ELSE f.failures + 1 END,
    refused = COALESCE(f.locked_until > now(), false),
    locked_until = CASE
        WHEN f.locked_until > now() THEN f.locked_until
        WHEN f.update_time >= now() - interval '1 day' AND f.failures + 1 >= $2
            THEN now() + make_interval(secs =>
                LEAST(power(2, LEAST(f.failures + 1 - $2, 30)), $3))
        ELSE NULL END,
    update_time = CASE WHEN f.locked_until > now() THEN f.update_time ELSE now() END
RETURNING locked_until, refused
