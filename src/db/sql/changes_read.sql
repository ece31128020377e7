-- The feed after a cursor ($1 xid, $2 seq), in (xid, seq) order, only
-- below the horizon: the oldest transaction still running in this
-- statement's snapshot that may write here (one running in another
-- database of the cluster, as pg_stat_activity shows, cannot), else the
-- snapshot's xmax. Every transaction below the horizon has ended, so no
-- row can appear there later. (A transaction seen running in another
-- database at one read and gone from pg_stat_activity by the next is taken
-- for one of ours: the horizon may step back, never past a row unseen.) Also, in the same snapshot: the horizon, the
-- purge mark, and the newest row visible (if it is at or above the
-- horizon, committed changes wait for an older transaction to end).
-- Unfiltered arguments are NULL. Always at least one row, with NULL change
-- columns when nothing matched.
SELECT h.horizon::text::bigint AS horizon, h.xmax::text::bigint AS xmax,
       p.xid::text::bigint AS purged_xid, p.seq AS purged_seq,
       (SELECT n.xid::text::bigint FROM changes n ORDER BY n.xid DESC, n.seq DESC LIMIT 1)
           AS newest,
       x.xid, x.seq, x.record_time, x.kind, x.user_id, x.session_id, x.group_id,
       x.api_key_id, x.actor_id, x.rpc, x.request_id, x.fields, x.end_reason
FROM (
    SELECT COALESCE(
        (SELECT x
         FROM pg_snapshot_xip(snap.s) AS x
         WHERE x::xid NOT IN (
             SELECT a.backend_xid FROM pg_stat_activity a
             WHERE a.backend_xid IS NOT NULL
               AND a.datid IS DISTINCT FROM
                   (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()))
         ORDER BY x LIMIT 1),
        pg_snapshot_xmax(snap.s)) AS horizon,
        pg_snapshot_xmax(snap.s) AS xmax
    FROM (SELECT pg_current_snapshot() AS s) snap
) h
CROSS JOIN change_purge p
LEFT JOIN LATERAL (
    SELECT c.xid::text::bigint AS xid, c.seq, c.record_time, c.kind, c.user_id,
           c.session_id, c.group_id, c.api_key_id, c.actor_id, c.rpc, c.request_id,
           c.fields, c.end_reason
    FROM changes c
    WHERE (c.xid, c.seq) > ($1::text::xid8, $2)
      AND c.xid < h.horizon
      AND ($3::smallint[] IS NULL OR c.kind = ANY ($3))
      AND ($4::uuid IS NULL OR c.user_id = $4)
      AND ($5::uuid IS NULL OR c.actor_id = $5)
    ORDER BY c.xid, c.seq
    LIMIT $6
) x ON true
ORDER BY x.xid, x.seq
