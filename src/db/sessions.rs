//! Sessions and refresh tokens, the fresh read behind every token check,
//! and failed-login counting.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, Bool, Bytea, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::groups::GroupRow;
use super::schema::{login_failures, retired_refresh_tokens, sessions};
use super::users::UserRow;
use crate::error::Error;

/// Why a session ended, as stored.
pub mod end_reason {
    pub const LOGOUT: &str = "logout";
    pub const PASSWORD_CHANGED: &str = "password_changed";
    pub const PASSWORD_SET: &str = "password_set";
    pub const REFRESH_REUSED: &str = "refresh_token_reused";
}

/// A new session row.
#[derive(Debug, Insertable)]
#[diesel(table_name = sessions)]
pub struct NewSessionRow<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub refresh_hash: &'a [u8],
    pub refresh_expire_time: DateTime<Utc>,
}

/// Starts a session.
pub async fn insert(conn: &mut AsyncPgConnection, row: &NewSessionRow<'_>) -> Result<(), Error> {
    diesel::insert_into(sessions::table)
        .values(row)
        .execute(conn)
        .await?;
    Ok(())
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
/// retired before ends its session: reuse means it leaked (OAuth 2.0
/// Security BCP, refresh token rotation).
pub async fn rotate(
    conn: &mut AsyncPgConnection,
    old_hash: &[u8],
    new_hash: &[u8],
    new_expire: DateTime<Utc>,
) -> Result<Rotation, Error> {
    let rotated: Option<Rotated> = diesel::sql_query(
        "WITH rotated AS ( \
             UPDATE sessions s SET refresh_hash = $2, refresh_expire_time = $3, refresh_time = now() \
             FROM users u \
             WHERE s.refresh_hash = $1 AND s.end_time IS NULL AND s.refresh_expire_time > now() \
               AND u.id = s.user_id AND u.is_active \
             RETURNING s.id, s.user_id \
         ), retired AS ( \
             INSERT INTO retired_refresh_tokens (hash, session_id) SELECT $1, id FROM rotated \
         ) \
         SELECT id, user_id FROM rotated",
    )
    .bind::<Bytea, _>(old_hash)
    .bind::<Bytea, _>(new_hash)
    .bind::<Timestamptz, _>(new_expire)
    .get_result(conn)
    .await
    .optional()?;
    if let Some(r) = rotated {
        return Ok(Rotation::Rotated {
            session_id: r.id,
            user_id: r.user_id,
        });
    }
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
            sessions::end_reason.eq(end_reason::REFRESH_REUSED),
        ))
        .returning(sessions::id)
        .get_results::<Uuid>(conn)
        .await?;
    if let Some(id) = ended.into_iter().next() {
        tracing::warn!(session_id = %id, "retired refresh token presented again: session ended");
        return Ok(Rotation::Reused);
    }
    Ok(Rotation::Invalid)
}

/// The session and user a refresh token (current or retired) belongs to.
pub async fn owner_of(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
) -> Result<Option<(Uuid, Uuid)>, Error> {
    let current = sessions::table
        .filter(sessions::refresh_hash.eq(hash))
        .select((sessions::id, sessions::user_id))
        .first::<(Uuid, Uuid)>(conn)
        .await
        .optional()?;
    if current.is_some() {
        return Ok(current);
    }
    Ok(retired_refresh_tokens::table
        .inner_join(sessions::table)
        .filter(retired_refresh_tokens::hash.eq(hash))
        .select((sessions::id, sessions::user_id))
        .first::<(Uuid, Uuid)>(conn)
        .await
        .optional()?)
}

/// Ends one session; whether it was live.
pub async fn end(conn: &mut AsyncPgConnection, id: Uuid, reason: &str) -> Result<bool, Error> {
    let n = diesel::update(
        sessions::table
            .find(id)
            .filter(sessions::end_time.is_null()),
    )
    .set((
        sessions::end_time.eq(diesel::dsl::now),
        sessions::end_reason.eq(reason),
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
    reason: &str,
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
            sessions::end_reason.eq(reason),
        ))
        .execute(conn)
        .await?)
}

/// What a token check needs, read in one round trip: the user now, whether
/// the session is live, when the password last changed, and the groups.
#[derive(Debug)]
pub struct Fresh {
    pub user: UserRow,
    pub session_live: bool,
    pub password_changed_at: DateTime<Utc>,
    pub groups: Vec<GroupRow>,
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

/// The user `user_id` and the state of its session `session_id`, fresh.
pub async fn fresh(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    session_id: Uuid,
) -> Result<Option<Fresh>, Error> {
    let row: Option<FreshRow> = diesel::sql_query(
        "SELECT u.id, u.username, u.email, u.first_name, u.last_name, u.is_superuser, \
                u.is_active, u.is_verified, u.attributes, u.create_time, u.update_time, \
                u.password_changed_at, \
                (s.id IS NOT NULL AND s.end_time IS NULL AND s.refresh_expire_time > now()) \
                    AS session_live, \
                g.group_ids, g.groupnames, g.slugs, g.group_times \
         FROM users u \
         LEFT JOIN sessions s ON s.id = $2 AND s.user_id = u.id \
         LEFT JOIN LATERAL ( \
             SELECT array_agg(gr.id ORDER BY gr.id) AS group_ids, \
                    array_agg(gr.groupname ORDER BY gr.id) AS groupnames, \
                    array_agg(gr.slug ORDER BY gr.id) AS slugs, \
                    array_agg(gr.create_time ORDER BY gr.id) AS group_times \
             FROM group_members gm JOIN groups gr ON gr.id = gm.group_id \
             WHERE gm.user_id = u.id \
         ) g ON true \
         WHERE u.id = $1",
    )
    .bind::<SqlUuid, _>(user_id)
    .bind::<SqlUuid, _>(session_id)
    .get_result(conn)
    .await
    .optional()?;
    Ok(row.map(|r| {
        let groups = match (r.group_ids, r.groupnames, r.slugs, r.group_times) {
            (Some(ids), Some(names), Some(slugs), Some(times)) => ids
                .into_iter()
                .zip(names)
                .zip(slugs)
                .zip(times)
                .map(|(((id, groupname), slug), create_time)| GroupRow {
                    id,
                    groupname,
                    slug,
                    create_time,
                })
                .collect(),
            _ => Vec::new(),
        };
        Fresh {
            user: UserRow {
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
            groups,
        }
    }))
}

/// When a throttled key may try again, if it is locked now.
pub async fn locked_until(
    conn: &mut AsyncPgConnection,
    key: &str,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(login_failures::table
        .find(key)
        .filter(login_failures::locked_until.gt(diesel::dsl::now))
        .select(login_failures::locked_until)
        .first::<Option<DateTime<Utc>>>(conn)
        .await
        .optional()?
        .flatten())
}

#[derive(Debug, QueryableByName)]
struct Failures {
    #[diesel(sql_type = Int4)]
    failures: i32,
}

/// Counts a failed login atomically (100 parallel failures count 100).
/// From the `free`-th consecutive failure on, the key is locked for a delay
/// that doubles from 1 s up to `max_delay_secs`.
pub async fn record_failure(
    conn: &mut AsyncPgConnection,
    key: &str,
    free: i32,
    max_delay_secs: i32,
) -> Result<i32, Error> {
    let row: Failures = diesel::sql_query(
        "INSERT INTO login_failures AS f (key, failures, locked_until, update_time) \
         VALUES ($1, 1, CASE WHEN 1 >= $2 THEN now() + interval '1 second' END, now()) \
         ON CONFLICT (key) DO UPDATE SET \
             failures = f.failures + 1, \
             locked_until = CASE WHEN f.failures + 1 >= $2 \
                 THEN now() + make_interval(secs => LEAST(power(2, LEAST(f.failures + 1 - $2, 30)), $3)) \
                 ELSE NULL END, \
             update_time = now() \
         RETURNING failures",
    )
    .bind::<Text, _>(key)
    .bind::<Int4, _>(free)
    .bind::<Int4, _>(max_delay_secs)
    .get_result(conn)
    .await?;
    Ok(row.failures)
}

/// Forgets the failures of a key (after a successful login).
pub async fn clear_failures(conn: &mut AsyncPgConnection, key: &str) -> Result<(), Error> {
    diesel::delete(login_failures::table.find(key))
        .execute(conn)
        .await?;
    Ok(())
}
