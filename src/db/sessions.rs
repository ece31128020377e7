//! Sessions and refresh tokens, and the fresh read behind every token check.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Bytea, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::prepared;
use super::schema::{retired_refresh_tokens, sessions};
use crate::domain::{EndReason, Group, User};

/// A new session row.
#[derive(Debug)]
pub struct NewSessionRow<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub refresh_hash: &'a [u8],
    pub refresh_expire_time: DateTime<Utc>,
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
            .bind::<Timestamptz, _>(password_changed_at),
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
}

/// Outcome of presenting a refresh token.
#[derive(Debug, PartialEq, Eq)]
pub enum Rotation {
    /// The token was current: it is retired and `new` replaces it.
    Rotated { session_id: Uuid, user_id: Uuid },
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
    pub session_id: Uuid,
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

/// What a token check needs, read in one round trip: the user now, whether
/// the session is live, when the password last changed, and the groups.
#[derive(Debug)]
pub struct Fresh {
    pub user: User,
    pub session_live: bool,
    pub password_changed_at: DateTime<Utc>,
    /// The user's groups when asked for (`with_groups`), else `None`.
    pub groups: Option<Vec<Group>>,
}

#[derive(Debug, QueryableByName)]
struct FreshRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    username: String,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    first_name: String,
    #[diesel(sql_type = Text)]
    last_name: String,
    #[diesel(sql_type = Bool)]
    is_superuser: bool,
    #[diesel(sql_type = Bool)]
    is_active: bool,
    #[diesel(sql_type = Bool)]
    is_verified: bool,
    #[diesel(sql_type = Jsonb)]
    attributes: serde_json::Value,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    password_changed_at: DateTime<Utc>,
    #[diesel(sql_type = Bool)]
    session_live: bool,
    #[diesel(sql_type = Nullable<Array<SqlUuid>>)]
    group_ids: Option<Vec<Uuid>>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    groupnames: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    slugs: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Array<Timestamptz>>)]
    group_times: Option<Vec<DateTime<Utc>>>,
}

/// The user `user_id` and the state of its session `session_id`, fresh;
/// with the user's groups when `with_groups` (VerifyToken answers with
/// them; the check of a bearer token needs none).
pub async fn fresh(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    session_id: Uuid,
    with_groups: bool,
) -> Result<Option<Fresh>, Error> {
    let row: Option<FreshRow> = if with_groups {
        prepared::<FreshSql, _>(
            diesel::sql_query(include_str!("sql/fresh.sql"))
                .bind::<SqlUuid, _>(user_id)
                .bind::<SqlUuid, _>(session_id),
        )
        .get_result(conn)
        .await
        .optional()?
    } else {
        prepared::<FreshWithoutGroupsSql, _>(
            diesel::sql_query(include_str!("sql/fresh_without_groups.sql"))
                .bind::<SqlUuid, _>(user_id)
                .bind::<SqlUuid, _>(session_id),
        )
        .get_result(conn)
        .await
        .optional()?
    };
    Ok(row.map(|r| {
        // Without groups, or with none (array_agg of no rows is NULL).
        let groups = match (r.group_ids, r.groupnames, r.slugs, r.group_times) {
            (Some(ids), Some(names), Some(slugs), Some(times)) => ids
                .into_iter()
                .zip(names)
                .zip(slugs)
                .zip(times)
                .map(|(((id, groupname), slug), create_time)| Group {
                    id,
                    groupname,
                    slug,
                    create_time,
                })
                .collect(),
            _ => Vec::new(),
        };
        Fresh {
            groups: with_groups.then_some(groups),
            user: User {
                id: r.id,
                username: r.username,
                email: r.email,
                first_name: r.first_name,
                last_name: r.last_name,
                is_superuser: r.is_superuser,
                is_active: r.is_active,
                is_verified: r.is_verified,
                attributes: r.attributes,
                create_time: r.create_time,
                update_time: r.update_time,
            },
            session_live: r.session_live,
            password_changed_at: r.password_changed_at,
        }
    }))
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
/// retired refresh tokens go with them); how many.
pub async fn purge_sessions(
    conn: &mut AsyncPgConnection,
    keep: chrono::Duration,
) -> Result<usize, Error> {
    let before = Utc::now() - keep;
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
struct FreshSql;
struct FreshWithoutGroupsSql;
struct StartSql;
