//! Administration of the database server itself, outside any one database:
//! `CREATE DATABASE` for the embedded cluster's `identity` database, run on
//! the server's `postgres` database before migrations.

use super::Error;

/// Creates `name` through the admin URL unless it exists.
pub async fn create_database(admin_url: &str, name: &str) -> Result<(), Error> {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

    diesel::table! { pg_database (datname) { datname -> Text, } }
    let mut conn = super::connect::establish(admin_url)
        .await
        .map_err(|e| Error::Unavailable(Box::new(e)))?;
    let exists: i64 = pg_database::table
        .filter(pg_database::datname.eq(name))
        .count()
        .get_result(&mut conn)
        .await?;
    if exists == 0 {
        conn.batch_execute(&format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "\"\"")
        ))
        .await?;
    }
    Ok(())
}
