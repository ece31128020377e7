//! The schema migrations in `migrations/`, embedded in the binary.
//!
//! diesel's migration harness is synchronous; `AsyncConnectionWrapper` gives
//! it a sync face over the async connection, and each call runs on the
//! blocking pool so that it works on any runtime flavour.

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_async::{AsyncPgConnection, async_connection_wrapper::AsyncConnectionWrapper};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::Error;

/// Every migration of `migrations/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

type SyncConn = AsyncConnectionWrapper<AsyncPgConnection>;

/// A migration and whether it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// The migration's version (its folder name).
    pub version: String,
    /// Whether the database has it.
    pub applied: bool,
}

async fn with_connection<T, F>(database_url: &str, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(&mut SyncConn) -> Result<T, Error> + Send + 'static,
{
    let conn = super::connect::establish(database_url).await?;
    tokio::task::spawn_blocking(move || {
        let mut conn = SyncConn::from(conn);
        f(&mut conn)
    })
    .await
    .map_err(|e| Error::Other(Box::new(e)))?
}

/// The advisory lock held while migrations run or are reverted: "identity"
/// in ASCII. diesel's harness takes none, so replicas starting together
/// would both try the same migration and one would fail; with it, the
/// second waits, then finds nothing pending.
const MIGRATION_LOCK: i64 = 0x6964_656e_7469_7479;

/// Runs `f` holding [`MIGRATION_LOCK`] (a session lock, released here and
/// in any case when the connection closes).
fn locked<T>(
    conn: &mut SyncConn,
    f: impl FnOnce(&mut SyncConn) -> Result<T, Error>,
) -> Result<T, Error> {
    use diesel::RunQueryDsl;
    use diesel::sql_types::BigInt;
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK)
        .execute(conn)?;
    let result = f(conn);
    let unlocked = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK)
        .execute(conn);
    // A migration's own error first: a failed unlock (the connection
    // gone, which releases the lock anyway) must not hide why.
    let value = result?;
    unlocked?;
    Ok(value)
}

/// Applies every pending migration; returns the versions applied. Run by
/// several processes at once, one applies them and the others wait for it
/// and apply none.
pub async fn run_pending(database_url: &str) -> Result<Vec<String>, Error> {
    with_connection(database_url, |conn| {
        locked(conn, |conn| {
            let applied = conn
                .run_pending_migrations(MIGRATIONS)
                .map_err(Error::Other)?;
            Ok(applied.iter().map(ToString::to_string).collect())
        })
    })
    .await
}

/// Reverts the last applied migration; returns its version.
pub async fn revert_last(database_url: &str) -> Result<String, Error> {
    with_connection(database_url, |conn| {
        locked(conn, |conn| {
            let reverted = conn
                .revert_last_migration(MIGRATIONS)
                .map_err(Error::Other)?;
            Ok(reverted.to_string())
        })
    })
    .await
}

/// Every embedded migration, oldest first, with whether it is applied.
pub async fn status(database_url: &str) -> Result<Vec<MigrationStatus>, Error> {
    with_connection(database_url, |conn| {
        let applied = conn.applied_migrations().map_err(Error::Other)?;
        let applied: Vec<String> = applied.iter().map(ToString::to_string).collect();
        let mut all: Vec<String> = MigrationSource::<Pg>::migrations(&MIGRATIONS)
            .map_err(Error::Other)?
            .iter()
            .map(|m| m.name().version().to_string())
            .collect();
        all.sort();
        Ok(all
            .into_iter()
            .map(|version| MigrationStatus {
                applied: applied.contains(&version),
                version,
            })
            .collect())
    })
    .await
}

/// The newest migration applied to the database; `None` when it has no
/// migrations table (it is not identity's).
pub async fn newest_applied(database_url: &str) -> Result<Option<String>, Error> {
    use diesel::sql_types::{Nullable, Text};
    use diesel_async::RunQueryDsl;

    #[derive(diesel::QueryableByName)]
    struct Newest {
        #[diesel(sql_type = Nullable<Text>)]
        name: Option<String>,
    }
    let mut conn = super::connect::establish(database_url).await?;
    let found: Newest =
        diesel::sql_query("SELECT to_regclass('__diesel_schema_migrations')::text AS name")
            .get_result(&mut conn)
            .await?;
    if found.name.is_none() {
        return Ok(None);
    }
    let newest: Newest =
        diesel::sql_query("SELECT max(version)::text AS name FROM __diesel_schema_migrations")
            .get_result(&mut conn)
            .await?;
    Ok(newest.name)
}
