WITH ended AS (DELETE FROM login_attempts WHERE id = $2)
INSERT INTO login_failures AS f (key, failures, locked_until, update_time)
VALUES ($1, 1, CASE WHEN 1 >= $3 THEN now() + interval '1 second' END, now())
ON CONFLICT (key) DO UPDATE SET
    failures = f.failures + 1,
    locked_until = CASE WHEN f.failures + 1 >= $3 THEN
        GREATEST(f.locked_until, now() + make_interval(secs =>
            LEAST(power(2, LEAST(f.failures + 1 - $3, 30)), $4)))
        ELSE f.locked_until END,
    update_time = now()
