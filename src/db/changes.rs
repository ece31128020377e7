//! The change feed's queries (the triggers that write it are in
//! `migrations/*_changes/up.sql`): the transaction that tells the triggers
//! who is acting, the read after a cursor, the purge, and the listening
//! connection that hears of new commits.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Int2, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager};
use uuid::Uuid;

use super::{Error, prepared};
use crate::domain::{Change, ChangeKind, Cursor};

/// The channel on which commits of changes are announced (no payload).
pub const CHANNEL: &str = "identity_changes";

/// Who makes the changes of a transaction: what the triggers record as
/// `actor_id`, `rpc` and `request_id`. Empty for SQL typed by hand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The user acting, if known.
    pub actor_id: Option<Uuid>,
    /// The RPC (`/identity.v1.UserService/UpdateUser`) or command.
    pub rpc: String,
    /// The call's request id.
    pub request_id: String,
    /// Whether the caller announces the commit itself (the service does,
    /// after the commit, so that no writer waits on PostgreSQL's
    /// notification lock); otherwise the triggers notify.
    pub announce: bool,
}

impl Origin {
    /// `BEGIN` and the transaction-local settings in one round trip (a
    /// simple-protocol batch, so no binds: every value is reduced to the
    /// characters a path or request id may have, and quoted).
    fn begin_sql(&self) -> String {
        fn literal(s: &str) -> String {
            let kept: String = s
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.:/ ".contains(*c))
                .take(256)
                .collect();
            format!("'{kept}'")
        }
        let actor = self.actor_id.map(|u| u.to_string()).unwrap_or_default();
        format!(
            "BEGIN; SELECT set_config('identity.actor_id', {}, true), \
             set_config('identity.rpc', {}, true), set_config('identity.request_id', {}, true), \
             set_config('identity.announce', {}, true)",
            literal(&actor),
            literal(&self.rpc),
            literal(&self.request_id),
            literal(if self.announce { "on" } else { "" }),
        )
    }
}

/// Runs `f` in a transaction whose changes are recorded as made by
/// `origin`; commits when `f` succeeds, rolls back when it fails. Costs no
/// round trip beyond diesel's own `BEGIN` and `COMMIT`.
pub async fn transaction<T, E, F>(
    conn: &mut AsyncPgConnection,
    origin: &Origin,
    f: F,
) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    AnsiTransactionManager::begin_transaction_sql(conn, &origin.begin_sql()).await?;
    match f(conn).await {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(conn).await?;
            Ok(value)
        }
        Err(e) => match AnsiTransactionManager::rollback_transaction(conn).await {
            Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(e),
            Err(rollback) => Err(rollback.into()),
        },
    }
}

/// Records the rest of the current transaction's changes as made by
/// `actor` (for a call that learns who acts only inside its transaction).
pub async fn act_as(conn: &mut AsyncPgConnection, actor: Uuid) -> Result<(), Error> {
    diesel::sql_query("SELECT set_config('identity.actor_id', $1, true)")
        .bind::<Text, _>(actor.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// A filter over the feed; `None` (or empty kinds) lets everything through.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these kinds.
    pub kinds: Vec<ChangeKind>,
    /// Only changes of this user.
    pub user_id: Option<Uuid>,
    /// Only changes made by this user.
    pub actor_id: Option<Uuid>,
}

/// One read of the feed.
#[derive(Debug)]
pub struct Read {
    /// The changes after the cursor, in feed order.
    pub changes: Vec<Change>,
    /// Every transaction below it that could write here had ended by the
    /// read's snapshot, and the read saw all of their changes that pass the
    /// filter (up to its limit).
    pub horizon: i64,
    /// Every change up to this cursor (the last one purged) has been purged.
    pub purged: Cursor,
    /// The snapshot's xmax: no transaction at or above it had begun to
    /// write, so no cursor of this feed can be there.
    pub xmax: i64,
    /// The transaction of the newest change visible, if any: at or above
    /// the horizon, committed changes wait for an older transaction to end.
    pub newest: Option<i64>,
}

#[derive(Debug, QueryableByName)]
struct ReadRow {
    #[diesel(sql_type = BigInt)]
    horizon: i64,
    #[diesel(sql_type = BigInt)]
    xmax: i64,
    #[diesel(sql_type = BigInt)]
    purged_xid: i64,
    #[diesel(sql_type = BigInt)]
    purged_seq: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    newest: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    xid: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    record_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<SmallInt>)]
    kind: Option<i16>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    user_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    session_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    group_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    api_key_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    actor_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Text>)]
    rpc: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    request_id: Option<String>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    fields: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Text>)]
    end_reason: Option<String>,
}

impl ReadRow {
    fn change(self) -> Option<Change> {
        Some(Change {
            cursor: Cursor {
                xid: self.xid?,
                seq: self.seq?,
            },
            commit_time: self.record_time?,
            // A number no kind has (written by hand) is skipped.
            kind: ChangeKind::from_number(i32::from(self.kind?))?,
            user_id: self.user_id,
            session_id: self.session_id,
            group_id: self.group_id,
            api_key_id: self.api_key_id,
            actor_id: self.actor_id,
            rpc: self.rpc.unwrap_or_default(),
            request_id: self.request_id.unwrap_or_default(),
            fields: self.fields.unwrap_or_default(),
            end_reason: self.end_reason.unwrap_or_default(),
        })
    }
}

struct ReadSql;

/// At most `limit` changes after `after` that pass `filter`, below the
/// horizon, with the horizon, the purge mark and the newest change of the
/// same snapshot.
pub async fn read(
    conn: &mut AsyncPgConnection,
    after: Cursor,
    filter: &Filter,
    limit: i64,
) -> Result<Read, Error> {
    let kinds: Option<Vec<i16>> =
        (!filter.kinds.is_empty()).then(|| filter.kinds.iter().map(|k| *k as i16).collect());
    let rows: Vec<ReadRow> = prepared::<ReadSql, _>(
        diesel::sql_query(include_str!("sql/changes_read.sql"))
            .bind::<BigInt, _>(after.xid)
            .bind::<BigInt, _>(after.seq)
            .bind::<Nullable<Array<Int2>>, _>(kinds)
            .bind::<Nullable<SqlUuid>, _>(filter.user_id)
            .bind::<Nullable<SqlUuid>, _>(filter.actor_id)
            .bind::<BigInt, _>(limit),
    )
    .load(conn)
    .await?;
    let first = <[ReadRow]>::first(&rows)
        .ok_or_else(|| Error::Other("the feed's read returned no row".into()))?;
    let (horizon, xmax, purged, newest) = (
        first.horizon,
        first.xmax,
        Cursor {
            xid: first.purged_xid,
            seq: first.purged_seq,
        },
        first.newest,
    );
    Ok(Read {
        changes: rows.into_iter().filter_map(ReadRow::change).collect(),
        horizon,
        purged,
        xmax,
        newest,
    })
}

/// The horizon, the purge mark and the newest change, without reading
/// changes.
pub async fn head(conn: &mut AsyncPgConnection) -> Result<Read, Error> {
    read(conn, Cursor::default(), &Filter::default(), 0).await
}

/// Deletes the changes recorded before `before` (whole transactions, only
/// below the horizon) and moves the purge mark past them; returns how many
/// changes went. The line is drawn at the first change, in feed order,
/// recorded at `before` or later (a walk of the primary key from its
/// start: the feed's order is its time order but for transactions that run
/// concurrently, so no index on the time is kept for this hourly purge).
pub async fn purge(conn: &mut AsyncPgConnection, before: DateTime<Utc>) -> Result<usize, Error> {
    // Below the snapshot's xmin (a stricter line than the readers' horizon:
    // this runs hourly, and need not know which database a transaction is
    // in).
    let deleted: Vec<CountRow> = diesel::sql_query(
        "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon), \
         keep AS ( \
             SELECT LEAST(h.horizon, COALESCE( \
                 (SELECT c.xid FROM changes c WHERE c.record_time >= $1 \
                  ORDER BY c.xid, c.seq LIMIT 1), h.horizon)) AS xid \
             FROM h), \
         gone AS (DELETE FROM changes c USING keep WHERE c.xid < keep.xid RETURNING c.xid, c.seq), \
         last AS (SELECT xid, seq FROM gone ORDER BY xid DESC, seq DESC LIMIT 1), \
         marked AS ( \
             UPDATE change_purge p SET xid = last.xid, seq = last.seq \
             FROM last WHERE (last.xid, last.seq) > (p.xid, p.seq) RETURNING 1) \
         SELECT (SELECT count(*) FROM gone) AS n, (SELECT count(*) FROM marked) AS m",
    )
    .bind::<Timestamptz, _>(before)
    .load(conn)
    .await?;
    Ok(<[CountRow]>::first(&deleted).map_or(0, |r| r.n as usize))
}

#[derive(Debug, QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = BigInt)]
    #[allow(dead_code)]
    m: i64,
}

/// The users the current transaction's changes are about (none if it made
/// none). A diesel error, so that any transaction's error type takes it.
pub async fn touched(conn: &mut AsyncPgConnection) -> Result<Vec<Uuid>, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Touched {
        #[diesel(sql_type = SqlUuid)]
        user_id: Uuid,
    }
    let rows: Vec<Touched> = prepared::<TouchedSql, _>(diesel::sql_query(
        "SELECT DISTINCT user_id FROM changes \
         WHERE xid = pg_current_xact_id_if_assigned() AND user_id IS NOT NULL",
    ))
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.user_id).collect())
}

struct TouchedSql;

/// Records that this replica's set of signing keys changed.
pub async fn record_keys_changed(conn: &mut AsyncPgConnection) -> Result<(), Error> {
    diesel::sql_query("SELECT identity_record_change($1, NULL, NULL, NULL)")
        .bind::<SmallInt, _>(ChangeKind::KeysChanged as i16)
        .execute(conn)
        .await?;
    Ok(())
}

/// Tells every listener that changes committed: a transaction of its own
/// that does not wait for its commit to be flushed (a notification lost in
/// a crash costs a poll, nothing more).
pub async fn announce(conn: &mut AsyncPgConnection) -> Result<(), Error> {
    use diesel_async::SimpleAsyncConnection;
    // One statement, so its own transaction: the setting holds for its
    // commit, and nothing is left open if the call is cancelled.
    conn.batch_execute(&format!(
        "SELECT set_config('synchronous_commit', 'off', true), pg_notify('{CHANNEL}', '')"
    ))
    .await?;
    Ok(())
}

/// A connection of its own that listens on [`CHANNEL`].
pub async fn listen(database_url: &str) -> Result<AsyncPgConnection, Error> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = super::connect::establish(database_url)
        .await
        .map_err(|e| Error::Unavailable(Box::new(e)))?;
    conn.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(conn)
}

/// A round trip, to learn that a connection still answers.
pub async fn ping(conn: &mut AsyncPgConnection) -> Result<(), Error> {
    use diesel_async::SimpleAsyncConnection;
    conn.batch_execute("SELECT 1").await?;
    Ok(())
}
