//! All diesel code: the pool, migrations, the embedded cluster, the schema,
//! row types and queries, and keyset pagination (`page`). Query functions
//! take a connection and return `Result<_, Error>`; the caller (a `service`)
//! owns the transaction. Long hand-written statements are `sql/*.sql`, each
//! included by the one function that runs it, as a `Prepared` statement.

pub mod accounts;
pub mod admin;
pub mod api_keys;
pub mod changes;
pub mod connect;
pub mod embedded;
mod error;
mod fresh;
pub mod groups;
pub mod migrations;
mod page;
pub mod restore;
// `diesel::table!` code: a module per table and a struct per column, whose
// docs would only repeat their names. The tables and columns are documented
// where they are defined, in `migrations/*/up.sql`.
#[allow(missing_docs)]
pub mod schema;
pub mod sessions;
pub mod throttle;
pub mod totp;
pub mod users;

pub use error::{BoxError, CHECKS, Error, Ref, UniqueKey};
pub use page::Page;

use std::time::Duration;

use diesel_async::{
    AsyncPgConnection,
    pooled_connection::{
        AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
        deadpool::{self, Object},
    },
};

/// The connection pool.
pub type Pool = deadpool::Pool<AsyncPgConnection>;
/// A connection borrowed from the pool.
pub type Conn = Object<AsyncPgConnection>;

/// How long a call waits for a free connection, or for a new one to be
/// made, before it answers UNAVAILABLE.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the pool without connecting. (`serve` needs the database at start,
/// to apply migrations; once serving, a database that goes away turns health
/// NOT_SERVING and calls UNAVAILABLE until it is back.) A connection that
/// cannot be made fails the call at once (deadpool creates connections in the
/// caller's checkout), so a database that is down answers UNAVAILABLE
/// without waiting out the caller's deadline.
pub fn pool(database_url: &str, size: u32) -> Result<Pool, Error> {
    let mut config = ManagerConfig::default();
    // No ping on every checkout: it would double the round trips of the hot
    // path. A broken connection is noticed by its failed query and dropped.
    config.recycling_method = RecyclingMethod::Fast;
    // A call cancelled mid-transaction (deadline, client gone) must not
    // leave its row locks behind for long, nor may a statement outlive any
    // call's deadline.
    config.custom_setup = Box::new(|url| {
        Box::pin(async move {
            use diesel_async::SimpleAsyncConnection;
            let mut conn = connect::establish(url).await?;
            conn.batch_execute(
                "SET idle_in_transaction_session_timeout = '10s'; SET statement_timeout = '60s'",
            )
            .await
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        })
    });
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    deadpool::Pool::builder(manager)
        .max_size(size as usize)
        .runtime(::deadpool::Runtime::Tokio1)
        .wait_timeout(Some(CHECKOUT_TIMEOUT))
        .create_timeout(Some(CHECKOUT_TIMEOUT))
        .recycle_timeout(Some(CHECKOUT_TIMEOUT))
        .build()
        .map_err(|e| Error::Other(Box::new(e)))
}

/// Borrows a connection; UNAVAILABLE when none can be had in time.
pub async fn conn(pool: &Pool) -> Result<Conn, Error> {
    Ok(pool.get().await?)
}

/// A hand-written statement (`diesel::sql_query(..).bind(..)`) that diesel
/// prepares once per connection and reuses, as it does for the query
/// builder's statements. `diesel::sql_query` alone is never cached, so
/// PostgreSQL would parse and plan it on every call: on the token check
/// behind every authenticated call, that was most of the database's work.
/// `M`, a marker type of its own per SQL text, names the statement in the
/// cache.
pub struct Prepared<M, T> {
    query: T,
    marker: std::marker::PhantomData<fn() -> M>,
}

/// Names the statement by its marker type `M`. The query is left out: its
/// binds may be token hashes, and `T` then needs no `Debug` of its own.
impl<M, T> std::fmt::Debug for Prepared<M, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("statement", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}

/// Wraps `query` as the cached statement named `M`.
pub fn prepared<M: 'static, T>(query: T) -> Prepared<M, T> {
    Prepared {
        query,
        marker: std::marker::PhantomData,
    }
}

impl<M: 'static, T> diesel::query_builder::QueryId for Prepared<M, T> {
    type QueryId = M;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<M, T: diesel::query_builder::Query> diesel::query_builder::Query for Prepared<M, T> {
    type SqlType = T::SqlType;
}

impl<M, T> diesel::query_builder::QueryFragment<diesel::pg::Pg> for Prepared<M, T>
where
    T: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
{
    fn walk_ast<'b>(
        &'b self,
        pass: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        self.query.walk_ast(pass)
    }

    // The SQL text is fixed for `M` and its bind types never vary.
    fn is_safe_to_cache_prepared(&self, _: &diesel::pg::Pg) -> diesel::QueryResult<bool> {
        Ok(true)
    }
}
