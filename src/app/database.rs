//! Where the data is: the `DATABASE_URL` given, or the embedded cluster
//! under `DATA_DIR` that this process starts and stops; and the one form of
//! its URL fit for a log line. Apart from `mod.rs` because the admin
//! commands (`cli::admin`) open the database the same way without serving.

use crate::config::Config;
use crate::db::embedded::{Durability, EmbeddedPostgres};

use super::StartupError;

/// The database of the embedded cluster.
const EMBEDDED_DATABASE: &str = "identity";

/// Where the data is: a URL given, or the embedded cluster this process owns.
/// Its `Debug` shows the URL without its password.
pub struct Database {
    /// The connection URL.
    pub url: String,
    /// The embedded cluster, when this process started it.
    pub embedded: Option<EmbeddedPostgres>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &mask_password(&self.url))
            .field("embedded", &self.embedded.is_some())
            .finish()
    }
}

impl Database {
    /// `DATABASE_URL`, or the embedded cluster under `DATA_DIR` (started, and
    /// its `identity` database created, when needed). A `DATABASE_URL` that
    /// cannot be read, or whose database refuses a first connection (TLS
    /// included: a certificate not trusted, not made for the host, a server
    /// without TLS under `sslmode=require`), fails here with one line
    /// naming it.
    pub async fn open(config: &Config) -> Result<Self, StartupError> {
        if let Some(url) = &config.database_url {
            let target = crate::db::connect::Target::parse(url)?;
            target
                .connect()
                .await
                .map_err(|e| StartupError::DatabaseConnect(mask_password(url), e))?;
            return Ok(Self {
                url: url.clone(),
                embedded: None,
            });
        }
        let data_dir = config.data_dir.clone();
        let bin_dir = config.pg_bin_dir.clone();
        let pg = tokio::task::spawn_blocking(move || {
            EmbeddedPostgres::start(&data_dir, bin_dir.as_deref(), Durability::Full)
        })
        .await
        .map_err(|e| StartupError::Other(e.to_string()))??;
        crate::db::admin::create_database(&pg.url("postgres"), EMBEDDED_DATABASE)
            .await
            .map_err(|e| StartupError::Database(e.into()))?;
        Ok(Self {
            url: pg.url(EMBEDDED_DATABASE),
            embedded: Some(pg),
        })
    }

    /// Stops the embedded cluster, if this process owns one.
    pub async fn close(self) -> Result<(), StartupError> {
        if let Some(mut pg) = self.embedded {
            tokio::task::spawn_blocking(move || pg.stop())
                .await
                .map_err(|e| StartupError::Other(e.to_string()))??;
        }
        Ok(())
    }
}

/// A database URL fit for a log line: user, hosts, ports and database only,
/// whatever form the URL takes (URL or key=value, password anywhere in it).
pub fn mask_password(url: &str) -> String {
    use tokio_postgres::config::Host;
    // Without the TLS options, which tokio-postgres does not read.
    let url = crate::db::connect::split_ssl_options(url).map_or(url.to_owned(), |(rest, _)| rest);
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "<unparseable database URL>".to_owned();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            Host::Tcp(name) => format!("{name}:{port}"),
            Host::Unix(path) => format!("{}", path.display()),
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::mask_password;

    #[test]
    fn database_passwords_never_reach_the_log_line() {
        for url in [
            "postgres://app:s3cr3t@db:5432/identity?sslmode=require",
            "postgres://app@db/identity?password=s3cr3t",
            "host=db user=app password=s3cr3t dbname=identity",
            "postgres://app:s3cr3t@db/identity?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            "host=db user=app password=s3cr3t sslrootcert='/etc/ca.pem' dbname=identity",
        ] {
            let shown = mask_password(url);
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(
                shown.contains("app@db") && shown.ends_with("/identity"),
                "{shown}"
            );
        }
        assert_eq!(
            mask_password("postgres://postgres@/identity?host=/srv/run"),
            "postgres://postgres@/srv/run/identity"
        );
        assert_eq!(mask_password("::nonsense::"), "<unparseable database URL>");
    }
}
