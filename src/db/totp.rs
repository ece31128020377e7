//! The second factor: TOTP factors (pending or on), recovery codes and
//! login challenges. Secrets arrive sealed and leave sealed: this module
//! never sees a TOTP secret in the clear, nor a recovery code or challenge
//! (only their SHA-256).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::schema::{mfa_challenges, recovery_codes, totp_factors};

/// `now()`, for a nullable time column.
fn now()
-> diesel::expression::SqlLiteral<diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>> {
    diesel::dsl::sql("now()")
}

/// A user's TOTP factor as stored.
#[derive(Queryable, Selectable)]
#[diesel(table_name = totp_factors, check_for_backend(diesel::pg::Pg))]
pub struct Factor {
    /// The secret, sealed with the MFA key (the user's id as associated
    /// data).
    pub secret: Vec<u8>,
    /// Set while the enrolment awaits its first code.
    pub pending_expire_time: Option<DateTime<Utc>>,
    /// Set once TOTP is on.
    pub confirm_time: Option<DateTime<Utc>>,
    /// The last time step whose code was accepted.
    pub last_used_step: Option<i64>,
}

impl std::fmt::Debug for Factor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sealed secret stays out.
        f.debug_struct("Factor")
            .field("pending_expire_time", &self.pending_expire_time)
            .field("confirm_time", &self.confirm_time)
            .field("last_used_step", &self.last_used_step)
            .finish_non_exhaustive()
    }
}

/// The factor of `user_id`, pending or on.
pub async fn factor(conn: &mut AsyncPgConnection, user_id: Uuid) -> Result<Option<Factor>, Error> {
    Ok(totp_factors::table
        .find(user_id)
        .select(Factor::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Stores a pending enrolment, replacing an earlier pending one; `false`
/// (and nothing stored) when TOTP is on already.
pub async fn begin(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    sealed_secret: &[u8],
    expire: DateTime<Utc>,
) -> Result<bool, Error> {
    let n = diesel::sql_query(
        "INSERT INTO totp_factors (user_id, secret, pending_expire_time) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id) DO UPDATE \
         SET secret = excluded.secret, pending_expire_time = excluded.pending_expire_time, \
             create_time = now() \
         WHERE totp_factors.confirm_time IS NULL",
    )
    .bind::<diesel::sql_types::Uuid, _>(user_id)
    .bind::<diesel::sql_types::Bytea, _>(sealed_secret)
    .bind::<diesel::sql_types::Timestamptz, _>(expire)
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Turns a pending enrolment on, with `step` as its first used code and
/// `recovery` (SHA-256 of each code) as its recovery codes; `false` when
/// nothing was pending or it lapsed.
pub async fn confirm(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    step: i64,
    recovery: &[Vec<u8>],
) -> Result<bool, Error> {
    let n = diesel::update(
        totp_factors::table
            .find(user_id)
            .filter(totp_factors::confirm_time.is_null())
            .filter(totp_factors::pending_expire_time.gt(diesel::dsl::now)),
    )
    .set((
        totp_factors::confirm_time.eq(now()),
        totp_factors::pending_expire_time.eq(None::<DateTime<Utc>>),
        totp_factors::last_used_step.eq(step),
    ))
    .execute(conn)
    .await?;
    if n == 0 {
        return Ok(false);
    }
    diesel::delete(recovery_codes::table.filter(recovery_codes::user_id.eq(user_id)))
        .execute(conn)
        .await?;
    let rows: Vec<_> = recovery
        .iter()
        .map(|hash| {
            (
                recovery_codes::user_id.eq(user_id),
                recovery_codes::code_hash.eq(hash.as_slice()),
            )
        })
        .collect();
    diesel::insert_into(recovery_codes::table)
        .values(rows)
        .execute(conn)
        .await?;
    Ok(true)
}

/// Records `step` as used, if it is later than any used before and TOTP
/// is on: `false` means the code was used already (or an older one after
/// a newer), or TOTP was turned off meanwhile.
pub async fn use_step(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    step: i64,
) -> Result<bool, Error> {
    let n = diesel::update(
        totp_factors::table
            .find(user_id)
            .filter(totp_factors::confirm_time.is_not_null())
            .filter(
                totp_factors::last_used_step
                    .is_null()
                    .or(totp_factors::last_used_step.lt(step)),
            ),
    )
    .set(totp_factors::last_used_step.eq(step))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Replaces a sealed secret by the same secret sealed with the current
/// MFA key, if it is still `old`.
pub async fn reseal(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    old: &[u8],
    new: &[u8],
) -> Result<(), Error> {
    diesel::update(
        totp_factors::table
            .find(user_id)
            .filter(totp_factors::secret.eq(old)),
    )
    .set(totp_factors::secret.eq(new))
    .execute(conn)
    .await?;
    Ok(())
}

/// Spends a recovery code of `user_id` by its hash: `false` when it is not
/// one of the user's, or was spent.
pub async fn use_recovery_code(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    hash: &[u8],
) -> Result<bool, Error> {
    let n = diesel::update(
        recovery_codes::table
            .find((user_id, hash))
            .filter(recovery_codes::use_time.is_null()),
    )
    .set(recovery_codes::use_time.eq(now()))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Removes the factor of `user_id` (pending or on), its recovery codes and
/// its pending login challenges; whether a factor that was on went.
pub async fn remove(conn: &mut AsyncPgConnection, user_id: Uuid) -> Result<bool, Error> {
    let removed: Option<Option<DateTime<Utc>>> = diesel::delete(totp_factors::table.find(user_id))
        .returning(totp_factors::confirm_time)
        .get_result(conn)
        .await
        .optional()?;
    diesel::delete(recovery_codes::table.filter(recovery_codes::user_id.eq(user_id)))
        .execute(conn)
        .await?;
    diesel::delete(mfa_challenges::table.filter(mfa_challenges::user_id.eq(user_id)))
        .execute(conn)
        .await?;
    Ok(matches!(removed, Some(Some(_))))
}

/// A login waiting for its second factor.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = mfa_challenges, check_for_backend(diesel::pg::Pg))]
pub struct Challenge {
    /// Whose login.
    pub user_id: Uuid,
    /// When the password it checked was set.
    pub password_changed_at: DateTime<Utc>,
}

/// Stores a challenge by its hash.
pub async fn create_challenge(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
    user_id: Uuid,
    password_changed_at: DateTime<Utc>,
    expire: DateTime<Utc>,
) -> Result<(), Error> {
    diesel::insert_into(mfa_challenges::table)
        .values((
            mfa_challenges::challenge_hash.eq(hash),
            mfa_challenges::user_id.eq(user_id),
            mfa_challenges::password_changed_at.eq(password_changed_at),
            mfa_challenges::expire_time.eq(expire),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// The live challenge with this hash, and its user's factor (sealed secret
/// and last used step) when TOTP is on: one round trip.
pub async fn challenge(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
) -> Result<Option<(Challenge, Option<Factor>)>, Error> {
    Ok(mfa_challenges::table
        .left_join(
            totp_factors::table.on(totp_factors::user_id
                .eq(mfa_challenges::user_id)
                .and(totp_factors::confirm_time.is_not_null())),
        )
        .filter(mfa_challenges::challenge_hash.eq(hash))
        .filter(mfa_challenges::expire_time.gt(diesel::dsl::now))
        .select((Challenge::as_select(), Option::<Factor>::as_select()))
        .first(conn)
        .await
        .optional()?)
}

/// Spends a challenge: `false` when it was spent already (a race) or
/// lapsed.
pub async fn spend_challenge(conn: &mut AsyncPgConnection, hash: &[u8]) -> Result<bool, Error> {
    let n = diesel::delete(
        mfa_challenges::table
            .filter(mfa_challenges::challenge_hash.eq(hash))
            .filter(mfa_challenges::expire_time.gt(diesel::dsl::now)),
    )
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Housekeeping: challenges past their 5 minutes and enrolments past their
/// 10; how many rows went.
pub async fn delete_expired(conn: &mut AsyncPgConnection) -> Result<usize, Error> {
    let challenges = diesel::delete(
        mfa_challenges::table.filter(mfa_challenges::expire_time.le(diesel::dsl::now)),
    )
    .execute(conn)
    .await?;
    let pending = diesel::delete(
        totp_factors::table
            .filter(totp_factors::confirm_time.is_null())
            .filter(totp_factors::pending_expire_time.le(diesel::dsl::now)),
    )
    .execute(conn)
    .await?;
    Ok(challenges + pending)
}
