//! API keys: made, listed, revoked; their last use noted. The fresh read
//! behind a key's check is `fresh::fresh_key`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::page::Page;
use super::schema::{api_keys, sessions};
use crate::domain::{ApiKey, EndReason, PageRequest};

pub use super::fresh::{FreshKey, fresh_key};

/// A key about to be stored.
#[derive(Insertable)]
#[diesel(table_name = api_keys)]
pub struct NewApiKeyRow<'a> {
    /// A new UUIDv7.
    pub id: Uuid,
    /// Whose key.
    pub user_id: Uuid,
    /// For people.
    pub display_name: &'a str,
    /// The secret's first characters; unique.
    pub prefix: &'a str,
    /// SHA-256 of the secret, never the secret.
    pub secret_hash: &'a [u8],
    /// Full method names; empty: not limited.
    pub allowed_methods: &'a [String],
    /// None: never expires.
    pub expire_time: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for NewApiKeyRow<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash stays out.
        f.debug_struct("NewApiKeyRow")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = api_keys, check_for_backend(diesel::pg::Pg))]
struct ApiKeyRow {
    id: Uuid,
    user_id: Uuid,
    display_name: String,
    prefix: String,
    allowed_methods: Vec<String>,
    create_time: DateTime<Utc>,
    expire_time: Option<DateTime<Utc>>,
    last_use_time: Option<DateTime<Utc>>,
    revoke_time: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for ApiKey {
    fn from(r: ApiKeyRow) -> Self {
        ApiKey {
            id: r.id,
            user_id: r.user_id,
            display_name: r.display_name,
            prefix: r.prefix,
            allowed_methods: r.allowed_methods,
            create_time: r.create_time,
            expire_time: r.expire_time,
            last_use_time: r.last_use_time,
            revoke_time: r.revoke_time,
        }
    }
}

/// Stores a key; `None` if its prefix is taken (make another secret).
pub async fn insert(
    conn: &mut AsyncPgConnection,
    row: &NewApiKeyRow<'_>,
) -> Result<Option<ApiKey>, Error> {
    Ok(diesel::insert_into(api_keys::table)
        .values(row)
        .on_conflict(api_keys::prefix)
        .do_nothing()
        .returning(ApiKeyRow::as_returning())
        .get_result(conn)
        .await
        .optional()?
        .map(Into::into))
}

/// The key `id`.
pub async fn by_id(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<ApiKey>, Error> {
    Ok(api_keys::table
        .find(id)
        .select(ApiKeyRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Into::into))
}

/// One page of a user's keys by id (oldest first), revoked ones included.
pub async fn list(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    page: PageRequest,
) -> Result<Page<ApiKey>, Error> {
    super::page::keyset(
        conn,
        page,
        api_keys::id,
        ApiKeyRow::as_select(),
        move || {
            api_keys::table
                .filter(api_keys::user_id.eq(user_id))
                .into_boxed()
        },
        |k: &ApiKey| k.id,
    )
    .await
}

/// Revokes key `id` (once: a revoked key keeps its revoke_time) and ends
/// the sessions ExchangeApiKey made from it; the key as it is now.
pub async fn revoke(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<ApiKey>, Error> {
    let now = Utc::now();
    diesel::update(
        api_keys::table
            .find(id)
            .filter(api_keys::revoke_time.is_null()),
    )
    .set(api_keys::revoke_time.eq(now))
    .execute(conn)
    .await?;
    diesel::update(
        sessions::table
            .filter(sessions::api_key_id.eq(id))
            .filter(sessions::end_time.is_null()),
    )
    .set((
        sessions::end_time.eq(now),
        sessions::end_reason.eq(EndReason::ApiKeyRevoked.as_str()),
    ))
    .execute(conn)
    .await?;
    by_id(conn, id).await
}

/// Notes a use of key `id`, unless one was noted in the last minute (no
/// change of the feed: its trigger watches revoke_time only).
pub async fn note_use(conn: &mut AsyncPgConnection, id: Uuid) -> Result<(), Error> {
    let minute_ago = Utc::now() - chrono::Duration::minutes(1);
    diesel::update(
        api_keys::table.find(id).filter(
            api_keys::last_use_time
                .is_null()
                .or(api_keys::last_use_time.lt(minute_ago)),
        ),
    )
    .set(api_keys::last_use_time.eq(diesel::dsl::now))
    .execute(conn)
    .await?;
    Ok(())
}
