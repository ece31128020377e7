//! Queries on `users`. The password hash is read only by the functions that
//! need it; `UserRow` does not carry it, so it cannot leak into a response.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::page::{Page, keyset};
use super::schema::{group_members, login_names, users};
use crate::domain::{PageRequest, User};

/// A user's row, as read (never its hash); the service sees [`User`].
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg))]
pub(crate) struct UserRow {
    pub id: Uuid,
    pub username: String,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub is_superuser: bool,
    pub is_active: bool,
    pub is_verified: bool,
    pub attributes: serde_json::Value,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub is_service: bool,
}

/// A user about to be inserted.
#[derive(Insertable)]
#[diesel(table_name = users)]
pub struct NewUserRow<'a> {
    /// A new UUIDv7, or the id an import brought.
    pub id: Uuid,
    /// As shown: NFKC, trimmed.
    pub username: &'a str,
    /// The NFKC case fold of `username`; unique.
    pub username_canonical: &'a str,
    /// As given, trimmed.
    pub email: &'a str,
    /// The NFKC case fold of `email`; unique.
    pub email_canonical: &'a str,
    /// An argon2id PHC string, or an imported argon2 or bcrypt hash.
    pub password_hash: &'a str,
    /// Given name; may be empty.
    pub first_name: &'a str,
    /// Family name; may be empty.
    pub last_name: &'a str,
    /// May administer users and groups.
    pub is_superuser: bool,
    /// An inactive user cannot log in and its tokens are refused.
    pub is_active: bool,
    /// Whether the email address was verified.
    pub is_verified: bool,
    /// A JSON object of strings (see [`crate::domain::Attributes`]).
    pub attributes: serde_json::Value,
    /// The folded username, email, first and last name that ListUsers'
    /// `query` matches ([`crate::domain::text::search_text`]).
    pub search: &'a str,
    /// From the service's clock, like the `jti` of tokens it is compared with.
    pub password_changed_at: DateTime<Utc>,
    /// A service account: no password (its hash is "!"), never logs in.
    pub is_service: bool,
}

impl std::fmt::Debug for NewUserRow<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash stays out.
        f.debug_struct("NewUserRow")
            .field("id", &self.id)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl From<UserRow> for User {
    fn from(r: UserRow) -> Self {
        User {
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
            is_service: r.is_service,
        }
    }
}

/// The mutable fields of a user, all written at once.
#[derive(Debug, AsChangeset)]
#[diesel(table_name = users)]
pub struct UserChangesRow {
    /// Given name; may be empty.
    pub first_name: String,
    /// Family name; may be empty.
    pub last_name: String,
    /// May administer users and groups.
    pub is_superuser: bool,
    /// An inactive user cannot log in and its tokens are refused.
    pub is_active: bool,
    /// Whether the email address was verified.
    pub is_verified: bool,
    /// A JSON object of strings; replaces the stored one whole.
    pub attributes: serde_json::Value,
    /// The search text, recomputed from the username, the email and the
    /// names written here.
    pub search: String,
    /// The service's clock at the change.
    pub update_time: DateTime<Utc>,
}

/// Which users a list holds (the service's filter, in the table's terms).
#[derive(Debug, Default, Clone, Copy)]
pub struct Filter<'a> {
    /// A `LIKE` pattern over the folded search text.
    pub search: Option<&'a str>,
    /// Only users with this `is_active`.
    pub is_active: Option<bool>,
    /// Only users with this `is_superuser`.
    pub is_superuser: Option<bool>,
    /// Only users with this `is_verified`.
    pub is_verified: Option<bool>,
    /// Only members of this group.
    pub group_id: Option<Uuid>,
}

/// Inserts a user; ALREADY_EXISTS names the field when one is taken, also
/// when another insert won a race for it.
pub async fn insert(conn: &mut AsyncPgConnection, row: &NewUserRow<'_>) -> Result<User, Error> {
    Ok(diesel::insert_into(users::table)
        .values(row)
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await?
        .into())
}

/// Claims a name the user logs in with; false when another user logs in
/// with it already (as a username or an email).
pub async fn claim_login_name(
    conn: &mut AsyncPgConnection,
    name: &str,
    user_id: Uuid,
) -> Result<bool, Error> {
    let inserted = diesel::insert_into(login_names::table)
        .values((login_names::name.eq(name), login_names::user_id.eq(user_id)))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

/// The user with this id.
pub async fn by_id(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<User>, Error> {
    Ok(users::table
        .find(id)
        .select(UserRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(User::from))
}

/// The user with this id, locked until the transaction ends.
pub async fn by_id_for_update(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<Option<User>, Error> {
    Ok(users::table
        .find(id)
        .select(UserRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?
        .map(User::from))
}

/// The user whose username has this canonical form.
pub async fn by_username(
    conn: &mut AsyncPgConnection,
    canonical: &str,
) -> Result<Option<User>, Error> {
    Ok(users::table
        .filter(users::username_canonical.eq(canonical))
        .select(UserRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(User::from))
}

/// The user whose email has this canonical form.
pub async fn by_email(
    conn: &mut AsyncPgConnection,
    canonical: &str,
) -> Result<Option<User>, Error> {
    Ok(users::table
        .filter(users::email_canonical.eq(canonical))
        .select(UserRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(User::from))
}

/// The canonical username and email of a user, for password rules.
pub async fn canonical_names(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<Option<(String, String, bool)>, Error> {
    Ok(users::table
        .find(id)
        .select((
            users::username_canonical,
            users::email_canonical,
            users::is_service,
        ))
        .first(conn)
        .await
        .optional()?)
}

fn filtered(filter: &Filter<'_>) -> users::BoxedQuery<'static, diesel::pg::Pg> {
    let mut query = users::table.into_boxed();
    if let Some(pattern) = &filter.search {
        query = query.filter(users::search.like(pattern.to_string()));
    }
    if let Some(v) = filter.is_active {
        query = query.filter(users::is_active.eq(v));
    }
    if let Some(v) = filter.is_superuser {
        query = query.filter(users::is_superuser.eq(v));
    }
    if let Some(v) = filter.is_verified {
        query = query.filter(users::is_verified.eq(v));
    }
    if let Some(group) = filter.group_id {
        query = query.filter(
            users::id.eq_any(
                group_members::table
                    .filter(group_members::group_id.eq(group))
                    .select(group_members::user_id),
            ),
        );
    }
    query
}

/// One page of the users matching `filter`, by id; how many match in all;
/// and whether more follow (one snapshot: see `page::keyset`).
pub async fn list(
    conn: &mut AsyncPgConnection,
    filter: &Filter<'_>,
    page: PageRequest,
) -> Result<Page<User>, Error> {
    keyset(
        conn,
        page,
        users::id,
        UserRow::as_select(),
        || filtered(filter),
        |u: &User| u.id,
    )
    .await
}

/// Writes the mutable fields of a user; `None` when there is no such user.
pub async fn update(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    changes: &UserChangesRow,
) -> Result<Option<User>, Error> {
    Ok(diesel::update(users::table.find(id))
        .set(changes)
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await
        .optional()?
        .map(User::from))
}

/// Deletes a user (memberships and sessions go with it, by foreign keys);
/// whether there was one.
pub async fn delete(conn: &mut AsyncPgConnection, id: Uuid) -> Result<bool, Error> {
    let n = diesel::delete(users::table.find(id)).execute(conn).await?;
    Ok(n > 0)
}

/// Marks the user verified; the user, or `None` when there is no such user.
pub async fn set_verified(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<User>, Error> {
    Ok(diesel::update(users::table.find(id))
        .set((
            users::is_verified.eq(true),
            users::update_time.eq(Utc::now()),
        ))
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await
        .optional()?
        .map(User::from))
}

/// Replaces a password hash and records when; whether there was such a user.
pub async fn set_password_hash(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    hash: &str,
) -> Result<bool, Error> {
    let now = Utc::now();
    let n = diesel::update(users::table.find(id))
        .set((
            users::password_hash.eq(hash),
            users::password_changed_at.eq(now),
            users::update_time.eq(now),
        ))
        .execute(conn)
        .await?;
    Ok(n > 0)
}

/// Whether a group with this id exists.
pub async fn group_exists(conn: &mut AsyncPgConnection, id: Uuid) -> Result<bool, Error> {
    use super::schema::groups;
    Ok(diesel::select(diesel::dsl::exists(groups::table.find(id)))
        .get_result(conn)
        .await?)
}

/// What a password check needs of a user: the row, its hash, and when the
/// password last changed (what a session is started against). Its `Debug`
/// leaves the hash out.
pub struct Credentials {
    /// The user, as the rest of the service sees it.
    pub user: User,
    /// The stored password hash: argon2 PHC, or an imported bcrypt hash.
    pub hash: String,
    /// When the password was last set: [`super::sessions::start`] starts a
    /// session only while it is unchanged.
    pub password_changed_at: DateTime<Utc>,
    /// Whether TOTP is on: a matching password then gives a challenge, not
    /// a session.
    pub has_totp: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password_changed_at", &self.password_changed_at)
            .finish_non_exhaustive()
    }
}

/// What a login needs of a user. A login name is a canonical username or
/// email; `login_names` makes it name one user only.
pub async fn for_login(
    conn: &mut AsyncPgConnection,
    canonical_login: &str,
) -> Result<Option<Credentials>, Error> {
    Ok(login_names::table
        .inner_join(users::table)
        .filter(login_names::name.eq(canonical_login))
        .select((
            UserRow::as_select(),
            users::password_hash,
            users::password_changed_at,
            diesel::dsl::exists(
                super::schema::totp_factors::table
                    .filter(super::schema::totp_factors::user_id.eq(users::id))
                    .filter(super::schema::totp_factors::confirm_time.is_not_null()),
            ),
        ))
        .first::<(UserRow, String, DateTime<Utc>, bool)>(conn)
        .await
        .optional()?
        .map(|(user, hash, password_changed_at, has_totp)| Credentials {
            user: user.into(),
            hash,
            password_changed_at,
            has_totp,
        }))
}

/// The password hash of a user, and when it was set.
pub async fn password_hash(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<Option<(String, DateTime<Utc>)>, Error> {
    Ok(users::table
        .find(id)
        .select((users::password_hash, users::password_changed_at))
        .first(conn)
        .await
        .optional()?)
}

/// Sets a new hash (and records when) only if the password is still the one
/// set at `changed_at` (a rehash to current parameters does not count as a
/// change); whether it was.
pub async fn replace_password_hash(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    changed_at: DateTime<Utc>,
    new: &str,
) -> Result<bool, Error> {
    let now = Utc::now();
    let n = diesel::update(
        users::table
            .find(id)
            .filter(users::password_changed_at.eq(changed_at)),
    )
    .set((
        users::password_hash.eq(new),
        users::password_changed_at.eq(now),
        users::update_time.eq(now),
    ))
    .execute(conn)
    .await?;
    Ok(n > 0)
}

/// Rewrites a hash with stronger parameters, unless the password changed
/// meanwhile (the old hash is no longer there).
pub async fn upgrade_password_hash(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    old: &str,
    new: &str,
) -> Result<(), Error> {
    diesel::update(users::table.find(id).filter(users::password_hash.eq(old)))
        .set(users::password_hash.eq(new))
        .execute(conn)
        .await?;
    Ok(())
}

/// The ids of the active superusers, locked until the transaction ends, so
/// that two concurrent demotions cannot both pass the "last one" check.
pub async fn lock_active_superusers(conn: &mut AsyncPgConnection) -> Result<Vec<Uuid>, Error> {
    Ok(users::table
        .filter(users::is_superuser.eq(true).and(users::is_active.eq(true)))
        .select(users::id)
        .order(users::id)
        .for_update()
        .load(conn)
        .await?)
}
