//! Administration of the database server itself, outside any one database:
//! `CREATE DATABASE` for the embedded cluster's `identity` database, run on
//! the server's `postgres` database before migrations; and the databases
//! `identity restore` restores into and swaps in.

use super::Error;

diesel::table! {
    /// The server's catalogue of databases (the column this file reads).
    pg_database (datname) {
        /// The database's name.
        datname -> Text,
    }
}

/// A connection to the server's admin database.
async fn connect(admin_url: &str) -> Result<diesel_async::AsyncPgConnection, Error> {
    super::connect::establish(admin_url)
        .await
        .map_err(|e| Error::Unavailable(Box::new(e)))
}

/// Whether the server has a database `name`.
async fn exists(conn: &mut diesel_async::AsyncPgConnection, name: &str) -> Result<bool, Error> {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::RunQueryDsl;
    let count: i64 = pg_database::table
        .filter(pg_database::datname.eq(name))
        .count()
        .get_result(conn)
        .await?;
    Ok(count > 0)
}

/// Creates `name` through the admin URL unless it exists.
pub async fn create_database(admin_url: &str, name: &str) -> Result<(), Error> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = connect(admin_url).await?;
    if !exists(&mut conn, name).await? {
        conn.batch_execute(&format!("CREATE DATABASE {}", quoted(name)))
            .await?;
    }
    Ok(())
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Drops `name` through the admin URL if it exists.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), Error> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = connect(admin_url).await?;
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS {}", quoted(name)))
        .await?;
    Ok(())
}

/// Creates the empty database `name` (from `template0`: a dump brings its
/// own extensions) through the admin URL.
pub async fn create_empty_database(admin_url: &str, name: &str) -> Result<(), Error> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = connect(admin_url).await?;
    conn.batch_execute(&format!(
        "CREATE DATABASE {} TEMPLATE template0",
        quoted(name)
    ))
    .await?;
    Ok(())
}

/// Puts `new` in the place of `name`, in one transaction: `name`, if there
/// is one, becomes `old` (then true). Nobody else may be connected to either: the
/// connections this process has just closed may take a moment to end,
/// which is waited for (10 s at most).
pub async fn swap_database(
    admin_url: &str,
    new: &str,
    name: &str,
    old: &str,
) -> Result<bool, Error> {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

    let mut conn = connect(admin_url).await?;
    let existed = exists(&mut conn, name).await?;
    diesel::table! { pg_stat_activity (pid) { pid -> Integer, datname -> Nullable<Text>, } }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let connected: i64 = pg_stat_activity::table
            .filter(pg_stat_activity::datname.eq_any([new, name]))
            .count()
            .get_result(&mut conn)
            .await?;
        if connected == 0 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let set_aside = if existed {
        format!(
            "ALTER DATABASE {} RENAME TO {}; ",
            quoted(name),
            quoted(old)
        )
    } else {
        String::new()
    };
    conn.batch_execute(&format!(
        "BEGIN; {set_aside}ALTER DATABASE {} RENAME TO {}; COMMIT",
        quoted(new),
        quoted(name)
    ))
    .await?;
    Ok(existed)
}
