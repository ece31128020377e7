-- The feed after a cursor, in commit order, with the head and the purge
-- mark read in the same snapshot (one statement): when fewer than $6 rows
-- come back, the reader has seen everything up to `head`. Unfiltered
-- arguments are NULL. Always at least one row (the head), with NULL change
-- columns when nothing matched.
SELECT k.head, k.purged_through,
       x.position, x.seq, x.commit_time, x.kind, x.user_id, x.session_id, x.group_id,
       x.api_key_id, x.actor_id, x.rpc, x.request_id, x.fields, x.end_reason
FROM (SELECT position AS head, purged_through FROM change_clock) k
LEFT JOIN LATERAL (
    SELECT c.position, ch.seq, c.commit_time, ch.kind, ch.user_id, ch.session_id,
           ch.group_id, ch.api_key_id, ch.actor_id, ch.rpc, ch.request_id, ch.fields,
           ch.end_reason
    FROM change_commits c
    JOIN changes ch ON ch.xid = c.xid
    WHERE c.position >= $1 AND (c.position > $1 OR ch.seq > $2)
      AND c.position <= k.head
      AND ($3::smallint[] IS NULL OR ch.kind = ANY ($3))
      AND ($4::uuid IS NULL OR ch.user_id = $4)
      AND ($5::uuid IS NULL OR ch.actor_id = $5)
    ORDER BY c.position, ch.seq
    LIMIT $6
) x ON true
ORDER BY x.position, x.seq
