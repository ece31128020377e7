//! Sessions and refresh tokens: starting a session, rotating and retiring
//! its refresh token, ending sessions, purging old ones. The fresh read
//! behind every token check ([`fresh`], [`Fresh`]) lives in `fresh.rs` and
//! is re-exported here.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Bytea, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::page::Page;
use super::prepared;
use super::schema::{retired_refresh_tokens, sessions};
use crate::domain::{EndReason, PageRequest, Session};

pub use super::fresh::{Fresh, fresh};

/// A new session row.
pub struct NewSessionRow<'a> {
    /// A new UUIDv7: the `sid` of the session's access tokens.
    pub id: Uuid,
    /// Whose session it is.
    pub user_id: Uuid,
    /// SHA-256 of the first refresh token, never the token itself; unique.
    pub refresh_hash: &'a [u8],
    /// When that refresh token expires (`REFRESH_TOKEN_TTL` after the login).
    pub refresh_expire_time: DateTime<Utc>,
    /// How the login was proved (RFC 8176 `amr`): `["pwd"]`,
    /// `["pwd", "otp"]`, `["pwd", "rcode"]`; empty for an API key's session.
    pub amr: &'a [String],
}

impl std::fmt::Debug for NewSessionRow<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash stays out.
        f.debug_struct("NewSessionRow")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

/// Starts a session, only if the user is still active and its password
/// still the one set at `password_changed_at` (the one the caller checked);
/// whether it started.
///
/// The user's row is share-locked for the insert: a password change (which
/// updates that row, then ends the user's sessions, in one transaction)
/// either committed before, and the row no longer matches, or waits for
/// this insert to commit and then ends the session it made. Either way no
/// session of the old password outlives the change. The hash itself is not
/// compared, since a login's rehash to current parameters changes it
/// without changing the password.
pub async fn start(
    conn: &mut AsyncPgConnection,
    row: &NewSessionRow<'_>,
    password_changed_at: DateTime<Utc>,
) -> Result<bool, Error> {
    let n = prepared::<StartSql, _>(
        diesel::sql_query(include_str!("sql/session_start.sql"))
            .bind::<SqlUuid, _>(row.id)
            .bind::<SqlUuid, _>(row.user_id)
            .bind::<Bytea, _>(row.refresh_hash)
            .bind::<Timestamptz, _>(row.refresh_expire_time)
            .bind::<Timestamptz, _>(password_changed_at)
            .bind::<Array<Text>, _>(row.amr),
    )
    .execute(conn)
    .await?;
    Ok(n == 1)
}

#[derive(Debug, QueryableByName)]
struct Rotated {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    user_id: Uuid,
    #[diesel(sql_type = Array<Text>)]
    amr: Vec<String>,
}

/// Outcome of presenting a refresh token.
#[derive(Debug, PartialEq, Eq)]
pub enum Rotation {
    /// The token was current: it is retired and `new` replaces it.
    Rotated {
        /// The session, which goes on under the new token.
        session_id: Uuid,
        /// The session's user.
        user_id: Uuid,
        /// How the session's login was proved.
        amr: Vec<String>,
    },
    /// The token was retired already: its session is now ended.
    Reused,
    /// Unknown, expired, or of an ended session or inactive user.
    Invalid,
}

/// Swaps the current refresh token for a new one in one statement (so two
/// concurrent calls cannot both win), retiring the old one. A token that was
/// retired before is reported as reused: it leaked (OAuth 2.0 Security BCP,
/// refresh token rotation), and the caller ends its session
/// ([`end_reused`]).
///
/// A session keeps its `keep_retired` newest retired tokens (the one
/// retired now included); older ones are forgotten in the same statement,
/// so a client refreshing in a loop cannot grow the table, and presenting
/// a forgotten one is [`Rotation::Invalid`], not reuse.
pub async fn rotate(
    conn: &mut AsyncPgConnection,
    old_hash: &[u8],
    new_hash: &[u8],
    new_expire: DateTime<Utc>,
    keep_retired: i64,
) -> Result<Rotation, Error> {
    let rotated: Option<Rotated> = prepared::<RotateSql, _>(
        diesel::sql_query(include_str!("sql/session_rotate.sql"))
            .bind::<Bytea, _>(old_hash)
            .bind::<Bytea, _>(new_hash)
            .bind::<Timestamptz, _>(new_expire)
            .bind::<diesel::sql_types::BigInt, _>(keep_retired),
    )
    .get_result(conn)
    .await
    .optional()?;
    if let Some(r) = rotated {
        return Ok(Rotation::Rotated {
            session_id: r.id,
            user_id: r.user_id,
            amr: r.amr,
        });
    }
    let retired: bool = diesel::select(diesel::dsl::exists(
        retired_refresh_tokens::table.filter(retired_refresh_tokens::hash.eq(old_hash)),
    ))
    .get_result(conn)
    .await?;
    Ok(if retired {
        Rotation::Reused
    } else {
        Rotation::Invalid
    })
}

/// Ends the session a retired refresh token belongs to (reuse detected).
pub async fn end_reused(conn: &mut AsyncPgConnection, old_hash: &[u8]) -> Result<(), Error> {
    let ended = diesel::update(sessions::table)
        .filter(
            sessions::id.eq_any(
                retired_refresh_tokens::table
                    .filter(retired_refresh_tokens::hash.eq(old_hash))
                    .select(retired_refresh_tokens::session_id),
            ),
        )
        .filter(sessions::end_time.is_null())
        .set((
            sessions::end_time.eq(diesel::dsl::now),
            sessions::end_reason.eq(EndReason::RefreshReused.as_str()),
        ))
        .returning(sessions::id)
        .get_results::<Uuid>(conn)
        .await?;
    for id in ended {
        tracing::warn!(session_id = %id, "retired refresh token presented again: session ended");
    }
    Ok(())
}

/// Whose refresh token this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenOwner {
    /// The session the token was issued in.
    pub session_id: Uuid,
    /// The session's user.
    pub user_id: Uuid,
    /// The session's current token, the session live and unexpired.
    pub current_and_live: bool,
}

/// The session and user a refresh token (current or retired) belongs to.
pub async fn owner_of(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
) -> Result<Option<TokenOwner>, Error> {
    let current = sessions::table
        .filter(sessions::refresh_hash.eq(hash))
        .select((
            sessions::id,
            sessions::user_id,
            sessions::end_time
                .is_null()
                .and(sessions::refresh_expire_time.gt(diesel::dsl::now)),
        ))
        .first::<(Uuid, Uuid, bool)>(conn)
        .await
        .optional()?;
    if let Some((session_id, user_id, live)) = current {
        return Ok(Some(TokenOwner {
            session_id,
            user_id,
            current_and_live: live,
        }));
    }
    Ok(retired_refresh_tokens::table
        .inner_join(sessions::table)
        .filter(retired_refresh_tokens::hash.eq(hash))
        .select((sessions::id, sessions::user_id))
        .first::<(Uuid, Uuid)>(conn)
        .await
        .optional()?
        .map(|(session_id, user_id)| TokenOwner {
            session_id,
            user_id,
            current_and_live: false,
        }))
}

/// Ends one session; whether it was live.
pub async fn end(conn: &mut AsyncPgConnection, id: Uuid, reason: EndReason) -> Result<bool, Error> {
    let n = diesel::update(
        sessions::table
            .find(id)
            .filter(sessions::end_time.is_null()),
    )
    .set((
        sessions::end_time.eq(diesel::dsl::now),
        sessions::end_reason.eq(reason.as_str()),
    ))
    .execute(conn)
    .await?;
    Ok(n > 0)
}

/// Ends every live session of a user but `except`; how many.
pub async fn end_all_of_user(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    except: Option<Uuid>,
    reason: EndReason,
) -> Result<usize, Error> {
    let mut query = diesel::update(sessions::table)
        .filter(sessions::user_id.eq(user_id))
        .filter(sessions::end_time.is_null())
        .into_boxed();
    if let Some(keep) = except {
        query = query.filter(sessions::id.ne(keep));
    }
    Ok(query
        .set((
            sessions::end_time.eq(diesel::dsl::now),
            sessions::end_reason.eq(reason.as_str()),
        ))
        .execute(conn)
        .await?)
}

/// Deletes retired refresh tokens older than `refresh_ttl`: by then they
/// could not have been valid anyway, so their reuse means nothing more.
pub async fn purge_retired(
    conn: &mut AsyncPgConnection,
    refresh_ttl: chrono::Duration,
) -> Result<usize, Error> {
    let before = Utc::now() - refresh_ttl;
    Ok(diesel::delete(
        retired_refresh_tokens::table.filter(retired_refresh_tokens::retire_time.lt(before)),
    )
    .execute(conn)
    .await?)
}

/// Deletes sessions that ended or expired more than `keep` ago (their
/// retired refresh tokens go with them); how many. A session that expired
/// without being ended is ended first, at its expiry, with the reason
/// EXPIRED, so that the change feed says so (the trigger takes the deletion
/// of a live session for its user's deletion).
pub async fn purge_sessions(
    conn: &mut AsyncPgConnection,
    keep: chrono::Duration,
) -> Result<usize, Error> {
    let before = Utc::now() - keep;
    diesel::update(
        sessions::table.filter(
            sessions::end_time
                .is_null()
                .and(sessions::refresh_expire_time.lt(before)),
        ),
    )
    .set((
        sessions::end_time.eq(sessions::refresh_expire_time.nullable()),
        sessions::end_reason.eq(EndReason::Expired.as_str()),
    ))
    .execute(conn)
    .await?;
    Ok(diesel::delete(
        sessions::table.filter(
            sessions::end_time
                .lt(before)
                .or(sessions::refresh_expire_time.lt(before)),
        ),
    )
    .execute(conn)
    .await?)
}

/// Names of the hand-written statements in the statement cache.
struct RotateSql;
struct StartSql;

/// The columns ListSessions shows.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = sessions, check_for_backend(diesel::pg::Pg))]
struct SessionRow {
    id: Uuid,
    user_id: Uuid,
    create_time: DateTime<Utc>,
    refresh_time: DateTime<Utc>,
    refresh_expire_time: DateTime<Utc>,
    end_time: Option<DateTime<Utc>>,
    end_reason: Option<String>,
    api_key_id: Option<Uuid>,
}

impl From<SessionRow> for Session {
    fn from(r: SessionRow) -> Self {
        Session {
            id: r.id,
            user_id: r.user_id,
            create_time: r.create_time,
            refresh_time: r.refresh_time,
            refresh_expire_time: r.refresh_expire_time,
            end_time: r.end_time,
            end_reason: r.end_reason,
            api_key_id: r.api_key_id,
        }
    }
}

fn of_user(user_id: Uuid, include_ended: bool) -> sessions::BoxedQuery<'static, diesel::pg::Pg> {
    let mut query = sessions::table
        .filter(sessions::user_id.eq(user_id))
        .into_boxed();
    if !include_ended {
        query = query
            .filter(sessions::end_time.is_null())
            .filter(sessions::refresh_expire_time.gt(diesel::dsl::now));
    }
    query
}

/// One page of a user's sessions by id (so oldest first): the live ones
/// (not ended, refresh token unexpired), or with `include_ended` all that
/// are kept (ended ones are purged a week after they end).
pub async fn list(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    include_ended: bool,
    page: PageRequest,
) -> Result<Page<Session>, Error> {
    super::page::keyset(
        conn,
        page,
        sessions::id,
        SessionRow::as_select(),
        || of_user(user_id, include_ended),
        |s: &Session| s.id,
    )
    .await
}

/// The session `id`, if there is one.
pub async fn by_id(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<Session>, Error> {
    Ok(sessions::table
        .find(id)
        .select(SessionRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Into::into))
}

/// Starts the session of an ExchangeApiKey token, named after its key and
/// only while the key is not revoked (the key's row is share-locked, so a
/// revocation either comes first and nothing starts, or waits and then
/// ends this session). Its refresh token is never given out; the session
/// lasts as long as its access token. Whether it started.
pub async fn start_for_key(
    conn: &mut AsyncPgConnection,
    row: &NewSessionRow<'_>,
    api_key_id: Uuid,
) -> Result<bool, Error> {
    let n = diesel::sql_query(
        "WITH k AS (SELECT id FROM api_keys WHERE id = $5 AND revoke_time IS NULL FOR SHARE) \
         INSERT INTO sessions (id, user_id, refresh_hash, refresh_expire_time, api_key_id, amr) \
         SELECT $1, $2, $3, $4, k.id, '{}' FROM k",
    )
    .bind::<SqlUuid, _>(row.id)
    .bind::<SqlUuid, _>(row.user_id)
    .bind::<Bytea, _>(row.refresh_hash)
    .bind::<Timestamptz, _>(row.refresh_expire_time)
    .bind::<SqlUuid, _>(api_key_id)
    .execute(conn)
    .await?;
    Ok(n == 1)
}
