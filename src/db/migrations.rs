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

/// Applies every pending migration; returns the versions applied.
pub async fn run_pending(database_url: &str) -> Result<Vec<String>, Error> {
    with_connection(database_url, |conn| {
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(Error::Other)?;
        Ok(applied.iter().map(ToString::to_string).collect())
    })
    .await
}

/// Reverts the last applied migration; returns its version.
pub async fn revert_last(database_url: &str) -> Result<String, Error> {
    with_connection(database_url, |conn| {
        let reverted = conn
            .revert_last_migration(MIGRATIONS)
            .map_err(Error::Other)?;
        Ok(reverted.to_string())
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
