//! The fresh read behind every token check (VerifyToken, the bearer
//! check): the user as it is now, whether the session is live, when the
//! password last changed and, when asked, the groups, in one prepared
//! statement (`sql/fresh.sql`, `sql/fresh_without_groups.sql`). Reached as
//! `db::sessions::fresh`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::prepared;
use super::users::UserRow;
use crate::domain::{Group, User};

/// What a token check needs, read in one round trip: the user now, whether
/// the session is live, when the password last changed, and the groups.
#[derive(Debug)]
pub struct Fresh {
    /// The user as it is now, not as the token's claims say.
    pub user: User,
    /// The session is the user's, not ended, and its refresh token unexpired.
    pub session_live: bool,
    /// When the password last changed: a token issued before is refused.
    pub password_changed_at: DateTime<Utc>,
    /// The session is the user's and not ended (its expiry aside): what a
    /// cache may keep, since an end is a change and an expiry is a time.
    pub session_open: bool,
    /// When the session's refresh token expires (none: no such session).
    pub session_expire_time: Option<DateTime<Utc>>,
    /// The user's groups when asked for (`with_groups`), else `None`.
    pub groups: Option<Vec<Group>>,
}

#[derive(Debug, QueryableByName)]
struct FreshRow {
    /// The user's columns, read by name like `users` rows everywhere.
    #[diesel(embed)]
    user: UserRow,
    #[diesel(sql_type = Timestamptz)]
    password_changed_at: DateTime<Utc>,
    #[diesel(sql_type = Bool)]
    session_live: bool,
    #[diesel(sql_type = Bool)]
    session_open: bool,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    session_expire_time: Option<DateTime<Utc>>,
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
    Ok(row.map(|r| r.into_fresh(with_groups)))
}

impl FreshRow {
    fn into_fresh(self, with_groups: bool) -> Fresh {
        let r = self;
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
            user: r.user.into(),
            session_live: r.session_live,
            password_changed_at: r.password_changed_at,
            session_open: r.session_open,
            session_expire_time: r.session_expire_time,
        }
    }
}

/// An API key found by its prefix, with its user and groups now, in the
/// shape of a session's fresh read: "live" is not revoked and not expired,
/// "open" is not revoked, the "expire time" is the key's (none: never).
#[derive(Debug)]
pub struct FreshKey {
    /// The key's id.
    pub key_id: Uuid,
    /// SHA-256 of its secret, to compare in constant time.
    pub secret_hash: Vec<u8>,
    /// The methods it is limited to (empty: none).
    pub allowed_methods: Vec<String>,
    /// Its user, groups and state.
    pub fresh: Fresh,
}

#[derive(Debug, QueryableByName)]
struct FreshKeyRow {
    #[diesel(embed)]
    fresh: FreshRow,
    #[diesel(sql_type = SqlUuid)]
    key_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Bytea)]
    secret_hash: Vec<u8>,
    #[diesel(sql_type = Array<Text>)]
    allowed_methods: Vec<String>,
}

/// The key with `prefix`, fresh, with its user's groups (`sql/fresh_key.sql`).
pub async fn fresh_key(
    conn: &mut AsyncPgConnection,
    prefix: &str,
) -> Result<Option<FreshKey>, Error> {
    let row: Option<FreshKeyRow> = prepared::<FreshKeySql, _>(
        diesel::sql_query(include_str!("sql/fresh_key.sql")).bind::<Text, _>(prefix),
    )
    .get_result(conn)
    .await
    .optional()?;
    Ok(row.map(|r| FreshKey {
        key_id: r.key_id,
        secret_hash: r.secret_hash,
        allowed_methods: r.allowed_methods,
        fresh: r.fresh.into_fresh(true),
    }))
}

/// Names of the hand-written statements in the statement cache.
struct FreshSql;
struct FreshKeySql;
struct FreshWithoutGroupsSql;
