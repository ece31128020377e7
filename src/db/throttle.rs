//! Throttling rows: consecutive failures and locks per key
//! (`login_failures`), and the password checks under way (`login_attempts`).
//! The rules live in `service::throttle`; these are its statements (the
//! long ones in `sql/throttle_*.sql`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Bool, Double, Int4, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::prepared;
use super::schema::{login_attempts, login_failures};

/// What a key's row says when an attempt arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A lease was taken: the attempt may check its password.
    Granted,
    /// The checks under way fill the budget: wait for one to end.
    Busy,
    /// Locked until then.
    Locked(DateTime<Utc>),
}

#[derive(Debug, QueryableByName)]
struct ClaimRow {
    #[diesel(sql_type = Bool)]
    granted: bool,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    locked_until: Option<DateTime<Utc>>,
}

/// Takes a lease `lease` on `key` for `lease_secs` if the key is not locked
/// and the failures so far plus the checks under way leave room: fewer than
/// `free` in all, or, once `free` failures are reached, one check at a
/// time between locks.
///
/// One round trip: the SQL function `identity_claim_login` (see its
/// migration) locks the key's row first, so concurrent claims on one key are
/// serialised and each counts the leases the claims before it took; no
/// more than the budget can ever be checking at once. (A transaction of
/// two statements does the same in four round trips; on a busy pool that
/// was a fifth of Login's throughput.)
pub async fn claim(
    conn: &mut AsyncPgConnection,
    key: &str,
    lease: Uuid,
    free: i32,
    lease_secs: f64,
) -> Result<Claim, Error> {
    let row: ClaimRow = prepared::<ClaimSql, _>(
        diesel::sql_query("SELECT granted, locked_until FROM identity_claim_login($1, $2, $3, $4)")
            .bind::<Text, _>(key)
            .bind::<SqlUuid, _>(lease)
            .bind::<Int4, _>(free)
            .bind::<Double, _>(lease_secs),
    )
    .get_result(conn)
    .await?;
    Ok(match (row.granted, row.locked_until) {
        (true, _) => Claim::Granted,
        (false, Some(until)) => Claim::Locked(until),
        (false, None) => Claim::Busy,
    })
}

/// The password matched: the lease ends and the key's failures are
/// forgotten (a lock, if any, is lifted).
pub async fn succeed(conn: &mut AsyncPgConnection, key: &str, lease: Uuid) -> Result<(), Error> {
    prepared::<SucceedSql, _>(
        diesel::sql_query(
            "WITH ended AS (DELETE FROM login_attempts WHERE id = $2) \
             DELETE FROM login_failures WHERE key = $1",
        )
        .bind::<Text, _>(key)
        .bind::<SqlUuid, _>(lease),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The password did not match: the lease ends and one more failure is
/// counted; from the `free`-th consecutive one on, the key is locked for a
/// delay that doubles from 1 s up to `max_delay_secs`.
pub async fn fail(
    conn: &mut AsyncPgConnection,
    key: &str,
    lease: Uuid,
    free: i32,
    max_delay_secs: i32,
) -> Result<(), Error> {
    prepared::<FailSql, _>(
        diesel::sql_query(include_str!("sql/throttle_fail.sql"))
            .bind::<Text, _>(key)
            .bind::<SqlUuid, _>(lease)
            .bind::<Int4, _>(free)
            .bind::<Int4, _>(max_delay_secs),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The check ended without a verdict (cancelled, timed out, no hashing
/// capacity, a database blip): the lease ends and nothing is counted.
pub async fn release(conn: &mut AsyncPgConnection, lease: Uuid) -> Result<(), Error> {
    diesel::delete(login_attempts::table.find(lease))
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug, QueryableByName)]
struct RequestRow {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    locked_until: Option<DateTime<Utc>>,
    #[diesel(sql_type = Bool)]
    refused: bool,
}

/// Counts a request on `key` that has no verdict to wait for (a password
/// reset asked for an address), in one statement; returns the lock it met,
/// if any. A request that arrives while the key is locked is refused and
/// neither counted nor allowed to move the lock (refusals cost nothing, so
/// they must not lengthen a lock). From the `free`-th request within a day
/// on, the key is locked for a delay doubling from 1 s to `max_delay_secs`.
pub async fn count_request(
    conn: &mut AsyncPgConnection,
    key: &str,
    free: i32,
    max_delay_secs: i32,
) -> Result<Option<DateTime<Utc>>, Error> {
    let row: RequestRow = prepared::<CountRequestSql, _>(
        diesel::sql_query(include_str!("sql/throttle_count_request.sql"))
            .bind::<Text, _>(key)
            .bind::<Int4, _>(free)
            .bind::<Int4, _>(max_delay_secs),
    )
    .get_result(conn)
    .await?;
    Ok(if row.refused { row.locked_until } else { None })
}

/// Forgets the failures of a key and lifts its lock (a new password set by
/// an administrator or a reset).
pub async fn clear(conn: &mut AsyncPgConnection, key: &str) -> Result<(), Error> {
    diesel::delete(login_failures::table.find(key))
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes throttling rows untouched for a day (their counts are forgotten
/// by then anyway) and leases past their expiry (of a replica that died
/// mid-check); how many rows.
pub async fn purge(conn: &mut AsyncPgConnection) -> Result<usize, Error> {
    let before = Utc::now() - chrono::Duration::days(1);
    let failures =
        diesel::delete(login_failures::table.filter(login_failures::update_time.lt(before)))
            .execute(conn)
            .await?;
    let leases = diesel::delete(
        login_attempts::table.filter(login_attempts::expire_time.lt(diesel::dsl::now)),
    )
    .execute(conn)
    .await?;
    Ok(failures + leases)
}

/// Names of the hand-written statements in the statement cache.
struct ClaimSql;
struct SucceedSql;
struct FailSql;
struct CountRequestSql;
