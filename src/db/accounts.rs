//! Single-use tokens of the account lifecycle (email verification, password
//! reset), stored as SHA-256 hashes.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::schema::account_tokens;

/// What a token is for; a token of one purpose never serves the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Confirms the email it was issued for (ConfirmEmail).
    VerifyEmail,
    /// Sets a new password without the old one (ResetPassword).
    ResetPassword,
}

impl Purpose {
    /// The stored value (`account_tokens.purpose`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Purpose::VerifyEmail => "verify_email",
            Purpose::ResetPassword => "reset_password",
        }
    }
}

/// Stores a new token's hash.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
    purpose: Purpose,
    user_id: Uuid,
    email_canonical: &str,
    expire_time: DateTime<Utc>,
) -> Result<(), Error> {
    diesel::insert_into(account_tokens::table)
        .values((
            account_tokens::hash.eq(hash),
            account_tokens::purpose.eq(purpose.as_str()),
            account_tokens::user_id.eq(user_id),
            account_tokens::email_canonical.eq(email_canonical),
            account_tokens::expire_time.eq(expire_time),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// The state of a presented token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// Unused and unexpired: for this user and canonical email.
    Valid {
        /// The user it was issued to.
        user_id: Uuid,
        /// The canonical email it was issued for: it serves only while that is
        /// still the user's email.
        email_canonical: String,
    },
    /// Used before.
    Used,
    /// Past its expiry.
    Expired,
    /// Unknown, or for another purpose.
    Unknown,
}

/// Reads the state of the token with `hash` for `purpose`, without using it.
pub async fn state(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
    purpose: Purpose,
) -> Result<TokenState, Error> {
    // user, email, expiry, use, and the database's now (one clock for all).
    type Row = (
        Uuid,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        DateTime<Utc>,
    );
    let row: Option<Row> = account_tokens::table
        .filter(account_tokens::hash.eq(hash))
        .filter(account_tokens::purpose.eq(purpose.as_str()))
        .select((
            account_tokens::user_id,
            account_tokens::email_canonical,
            account_tokens::expire_time,
            account_tokens::use_time,
            diesel::dsl::now.into_sql::<diesel::sql_types::Timestamptz>(),
        ))
        .first(conn)
        .await
        .optional()?;
    Ok(match row {
        None => TokenState::Unknown,
        Some((_, _, _, Some(_), _)) => TokenState::Used,
        Some((_, _, expire, None, now)) if expire <= now => TokenState::Expired,
        Some((user_id, email_canonical, ..)) => TokenState::Valid {
            user_id,
            email_canonical,
        },
    })
}

/// Uses the token with `hash` for `purpose` if it is still valid, in one
/// statement, so that two concurrent uses cannot both succeed. `None` when
/// it was not valid (see [`state`] for why).
pub async fn use_token(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
    purpose: Purpose,
) -> Result<Option<(Uuid, String)>, Error> {
    Ok(diesel::update(
        account_tokens::table
            .filter(account_tokens::hash.eq(hash))
            .filter(account_tokens::purpose.eq(purpose.as_str()))
            .filter(account_tokens::use_time.is_null())
            .filter(account_tokens::expire_time.gt(diesel::dsl::now)),
    )
    .set(account_tokens::use_time.eq(diesel::dsl::now))
    .returning((account_tokens::user_id, account_tokens::email_canonical))
    .get_result(conn)
    .await
    .optional()?)
}

/// Spends every unused token of `user_id` for `purpose` (after a reset, the
/// other reset links in the user's mailbox must not work either).
pub async fn spend_all(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    purpose: Purpose,
) -> Result<usize, Error> {
    Ok(diesel::update(
        account_tokens::table
            .filter(account_tokens::user_id.eq(user_id))
            .filter(account_tokens::purpose.eq(purpose.as_str()))
            .filter(account_tokens::use_time.is_null()),
    )
    .set(account_tokens::use_time.eq(diesel::dsl::now))
    .execute(conn)
    .await?)
}

/// Deletes tokens that expired more than a day ago.
pub async fn purge(conn: &mut AsyncPgConnection) -> Result<usize, Error> {
    let day_ago = Utc::now() - chrono::Duration::days(1);
    Ok(
        diesel::delete(account_tokens::table.filter(account_tokens::expire_time.lt(day_ago)))
            .execute(conn)
            .await?,
    )
}
