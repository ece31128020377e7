//! After a restore (`identity after-restore`, and the last step of
//! `identity restore`): what a backup brings back that must not work
//! again. A backup holds the sessions live when it was taken and the
//! account tokens unspent then; some have ended or been spent since, and
//! the database no longer knows which. So every one of them stops working:
//! sessions end (reason `restored`; their users log in again), account
//! tokens are spent (a new one is asked for), pending second-factor logins
//! are dropped (the password is entered again).
//!
//! And the change feed starts again after the restore: a feed consumer's
//! cursor from before it names history that may have been undone, so it is
//! refused (CURSOR_EXPIRED) and its holder re-reads the state, and every
//! replica's verification cache starts empty. Rows of a feed written by
//! another cluster (a dump taken elsewhere) carry transaction ids this
//! cluster has not reached; left there, readers would wait for them
//! forever, so they are moved below the new start, with the rest of the
//! history (kept for SQL until CHANGES_RETENTION purges it).
//!
//! All of it in the caller's one transaction, so that it happens whole or
//! not at all; the triggers record each ended session in the feed, which
//! every running replica's cache follows.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::Error;
use super::accounts::Purpose;
use super::schema::{account_tokens, mfa_challenges, sessions};
use crate::domain::EndReason;

/// What [`after_restore`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfterRestore {
    /// Sessions ended (reason `restored`).
    pub sessions_ended: usize,
    /// Unexpired password reset tokens spent.
    pub reset_tokens_spent: usize,
    /// Unexpired email verification tokens spent.
    pub verification_tokens_spent: usize,
    /// Logins waiting for their second factor dropped.
    pub mfa_challenges_dropped: usize,
    /// Rows of another cluster's feed moved below the new start.
    pub foreign_changes_moved: usize,
}

#[derive(Debug, QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Ends every session, spends every account token, drops every pending
/// second-factor login and starts the change feed again; run it in a
/// transaction of its own (the first statement must be its first write).
pub async fn after_restore(conn: &mut AsyncPgConnection) -> Result<AfterRestore, Error> {
    // First, while this transaction has written nothing to the feed: the
    // new start, below every transaction still running (their changes stay
    // readable) and below this one (whose changes are the first after it).
    // A mark at or above the snapshot's xmax was set by another cluster
    // (a dump taken elsewhere, whose purge had moved it there): left
    // there, every cursor of this cluster would be below it, and expired.
    diesel::sql_query(
        "UPDATE change_purge p SET xid = m.xid, seq = m.seq \
         FROM (SELECT (LEAST(pg_snapshot_xmin(pg_current_snapshot()), pg_current_xact_id()) \
                       ::text::bigint - 1)::text::xid8 AS xid, \
                      9223372036854775807::bigint AS seq) m \
         WHERE (m.xid, m.seq) > (p.xid, p.seq) \
            OR p.xid >= pg_snapshot_xmax(pg_current_snapshot())",
    )
    .execute(conn)
    .await?;
    // A committed transaction of this cluster is below the snapshot's xmax:
    // a row at or above it came from elsewhere. (Its seq, from the same
    // restored sequence as every other row's, keeps the key unique.)
    let moved: Vec<Count> = diesel::sql_query(
        "WITH moved AS ( \
             UPDATE changes c SET xid = p.xid FROM change_purge p \
             WHERE c.xid >= pg_snapshot_xmax(pg_current_snapshot()) RETURNING 1) \
         SELECT count(*) AS n FROM moved",
    )
    .load(conn)
    .await?;

    let sessions_ended = diesel::update(sessions::table.filter(sessions::end_time.is_null()))
        .set((
            sessions::end_time.eq(diesel::dsl::now),
            sessions::end_reason.eq(EndReason::Restored.as_str()),
        ))
        .execute(conn)
        .await?;

    let spent: Vec<String> = diesel::update(
        account_tokens::table
            .filter(account_tokens::use_time.is_null())
            .filter(account_tokens::expire_time.gt(diesel::dsl::now)),
    )
    .set(account_tokens::use_time.eq(diesel::dsl::now))
    .returning(account_tokens::purpose)
    .get_results(conn)
    .await?;
    // Expired ones cannot be used anyway; spent too, for a clean slate.
    diesel::update(account_tokens::table.filter(account_tokens::use_time.is_null()))
        .set(account_tokens::use_time.eq(diesel::dsl::now))
        .execute(conn)
        .await?;

    let mfa_challenges_dropped = diesel::delete(mfa_challenges::table).execute(conn).await?;

    Ok(AfterRestore {
        sessions_ended,
        reset_tokens_spent: spent
            .iter()
            .filter(|p| *p == Purpose::ResetPassword.as_str())
            .count(),
        verification_tokens_spent: spent
            .iter()
            .filter(|p| *p == Purpose::VerifyEmail.as_str())
            .count(),
        mfa_challenges_dropped,
        foreign_changes_moved: <[Count]>::first(&moved).map_or(0, |c| c.n as usize),
    })
}
