//! Start-up and shutdown: [`Application::build`] prepares the database and
//! binds the listener; [`Application::run_until_stopped`] serves until the
//! shutdown future resolves, lets in-flight calls finish, then stops the
//! embedded cluster. Binding before serving is what lets a test use port 0
//! and connect at once, without sleeping.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::config::Config;
use crate::db::{
    self, Pool,
    embedded::{Durability, EmbeddedError, EmbeddedPostgres},
};
use crate::error::Error;
use crate::grpc::{AccountsGrpc, AuthGrpc, GroupsGrpc, UsersGrpc, authz::AuthLayer};
use crate::hashing::Hasher;
use crate::limits::{BodyLimitLayer, DeadlineLayer, ShedLayer, StreamLimit};
use crate::proto::{self, identity::v1 as pb};
use crate::service::{AccountService, AuthService, GroupService, UserService};
use crate::token::{KeyStore, TokenIssuer, keys::KeyError};

/// The database of the embedded cluster.
const EMBEDDED_DATABASE: &str = "identity";
/// How often the health service looks at the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Why the service could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The embedded cluster failed.
    #[error("embedded PostgreSQL: {0}")]
    Embedded(#[from] EmbeddedError),
    /// The database could not be prepared.
    #[error("database: {0}")]
    Database(#[source] Error),
    /// The password hashing threads could not start.
    #[error("password hashing: {0}")]
    Hashing(#[from] crate::hashing::HasherError),
    /// The listener could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// The signing keys could not be loaded.
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    /// A TLS file could not be read or used; the string names the variable.
    #[error("{0}: {1}")]
    Tls(&'static str, String),
    /// The server failed.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// Where the data is: a URL given, or the embedded cluster this process owns.
#[derive(Debug)]
pub struct Database {
    /// The connection URL.
    pub url: String,
    /// The embedded cluster, when this process started it.
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// `DATABASE_URL`, or the embedded cluster under `DATA_DIR` (started, and
    /// its `identity` database created, when needed).
    pub async fn open(config: &Config) -> Result<Self, StartupError> {
        if let Some(url) = &config.database_url {
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
        create_database(&pg.url("postgres"), EMBEDDED_DATABASE)
            .await
            .map_err(StartupError::Database)?;
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

/// Creates `name` through the admin URL unless it exists.
pub async fn create_database(admin_url: &str, name: &str) -> Result<(), Error> {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

    diesel::table! { pg_database (datname) { datname -> Text, } }
    let mut conn = AsyncPgConnection::establish(admin_url)
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

/// The service, built and bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    pool: Pool,
    database: Database,
    users: UserService,
    accounts: AccountService,
    auth: AuthService,
    groups: GroupService,
    registration_open: bool,
    limits: Limits,
    keys: KeysSource,
    metrics: crate::metrics::Metrics,
    streams: StreamLimit,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Where the signing keys come from, for reloading them.
#[derive(Debug, Clone)]
struct KeysSource {
    activation_delay: Duration,
    dir: std::path::PathBuf,
    algorithm: crate::config::JwtAlgorithm,
    interval: Duration,
}

/// The limits of [`crate::limits`], from the configuration.
#[derive(Debug, Clone, Copy)]
struct Limits {
    refresh_ttl: Duration,
    request_timeout: Duration,
    shutdown_grace: Duration,
    max_concurrent_requests: usize,
    http2_max_concurrent_streams: u32,
}

/// The largest request message: 64 KiB is far above any valid request.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

impl Application {
    /// Opens the database, applies pending migrations, builds the services
    /// and binds `LISTEN_ADDR`.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        // First: settings argon2 refuses together fail before any database
        // work, with a message of their own.
        let hasher = Hasher::new(
            config.hash_params(),
            config.hash_concurrency(),
            config.hash_queue as usize,
        )?;
        let database = Database::open(config).await?;
        let applied = db::migrations::run_pending(&database.url)
            .await
            .map_err(|e| StartupError::Database(e.into()))?;
        if !applied.is_empty() {
            tracing::info!(migrations = ?applied, "applied migrations");
        }
        let pool = db::pool(&database.url, config.pool_size())
            .map_err(|e| StartupError::Database(e.into()))?;
        let keys_dir = config.keys_dir.clone();
        let alg = config.jwt_algorithm;
        let delay = config.keys_activation_delay;
        let keys =
            tokio::task::spawn_blocking(move || KeyStore::load_or_generate(&keys_dir, alg, delay))
                .await
                .map_err(|e| StartupError::Other(e.to_string()))??;
        let kids: Vec<String> = keys.keys().iter().map(|k| k.kid.clone()).collect();
        let tokens = TokenIssuer::new(
            keys,
            config.jwt_issuer.clone(),
            config.jwt_audience.clone(),
            config.access_token_ttl,
        );
        let streams = StreamLimit::new(config.max_streams as usize);
        let metrics = crate::metrics::Metrics::new(pool.clone(), hasher.clone(), streams.clone())
            .map_err(|e| StartupError::Other(format!("metrics: {e}")))?;
        let users = UserService::new(pool.clone(), hasher.clone());
        let accounts = AccountService::new(
            pool.clone(),
            hasher.clone(),
            config.email_verification_ttl,
            config.password_reset_ttl,
        );
        let auth = AuthService::new(
            pool.clone(),
            hasher,
            tokens,
            config.refresh_token_ttl,
            config.request_timeout,
        )
        .require_verified_login(config.require_verified_login);
        let groups = GroupService::new(pool.clone());
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|e| StartupError::Bind(config.listen_addr, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| StartupError::Bind(config.listen_addr, e))?;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            listen_addr = %local_addr,
            workers = config.worker_threads(),
            db_pool_size = config.pool_size(),
            database = %mask_password(&database.url),
            embedded = database.embedded.is_some(),
            hash_concurrency = config.hash_concurrency(),
            tls = config.tls_cert.is_some(),
            signing_kid = %kids[0],
            kids = ?kids,
            "identity ready"
        );
        Ok(Self {
            listener,
            local_addr,
            pool,
            database,
            users,
            accounts,
            auth,
            groups,
            registration_open: config.allow_registration,
            metrics,
            streams,
            tls: tls_config(config)?,
            keys: KeysSource {
                activation_delay: config.keys_activation_delay,
                dir: config.keys_dir.clone(),
                algorithm: config.jwt_algorithm,
                interval: config.keys_reload_interval,
            },
            limits: Limits {
                refresh_ttl: config.refresh_token_ttl,
                request_timeout: config.request_timeout,
                shutdown_grace: config.shutdown_grace,
                max_concurrent_requests: config.max_concurrent_requests as usize,
                http2_max_concurrent_streams: config.http2_max_concurrent_streams,
            },
        })
    }

    /// The address the listener is bound to (the real port when given 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves; in-flight calls then finish, and
    /// the embedded cluster (if any) is stopped.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartupError::Other(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartupError::Other(e.to_string()))?;

        // The first look at the database happens before serving, so that
        // every service name is registered by the first health call.
        let mut prober = Prober::new(self.database.url.clone());
        let first = report_database(&mut prober, &reporter, None).await;
        let (stop_health, health_stopped) = tokio::sync::watch::channel(false);
        let janitor = tokio::spawn(purge_old_rows(
            self.pool.clone(),
            self.limits.refresh_ttl,
            health_stopped.clone(),
        ));
        let reloader = tokio::spawn(reload_keys(
            self.keys.clone(),
            self.auth.tokens().clone(),
            health_stopped.clone(),
        ));
        let draining = reporter.clone();
        let watcher = tokio::spawn(watch_database(prober, reporter, first, health_stopped));

        let mut routes = tonic::service::Routes::builder();
        routes
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(pb::user_service_server::UserServiceServer::new(
                UsersGrpc::new(self.users, self.registration_open),
            ))
            .add_service(pb::group_service_server::GroupServiceServer::new(
                GroupsGrpc::new(self.groups),
            ))
            .add_service(pb::auth_service_server::AuthServiceServer::new(
                AuthGrpc::new(self.auth.clone()),
            ))
            .add_service(pb::account_service_server::AccountServiceServer::new(
                AccountsGrpc::new(self.accounts),
            ));
        let http = crate::http::routes(self.auth.tokens().clone(), self.metrics.clone());
        let routes = tonic::service::Routes::from(routes.routes().into_axum_router().merge(http));

        let layers = tower::ServiceBuilder::new()
            .layer(crate::telemetry::RequestContextLayer)
            .layer(crate::metrics::MetricsLayer::new(self.metrics.clone()))
            // Streams first: they are exempt from the two below.
            .layer(self.streams.layer())
            .layer(ShedLayer::new(self.limits.max_concurrent_requests))
            .layer(DeadlineLayer::new(self.limits.request_timeout))
            .layer(BodyLimitLayer::new(MAX_MESSAGE_BYTES + 5))
            .layer(AuthLayer::new(self.auth));
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let streams = self.streams.clone();
        let signalled = async move {
            shutdown.await;
            tracing::info!("shutting down: no new calls, waiting for those in flight");
            // Tell load balancers at once; the background tasks stop too.
            let _ = stop_health.send(true);
            draining
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for name in service_names() {
                draining
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            // Open streams end with OK (a health watcher after hearing
            // NOT_SERVING), so that the drain below waits only for unary
            // calls, which REQUEST_TIMEOUT bounds.
            streams.close();
            let _ = shutdown_tx.send(());
        };
        // Accepted connections get TCP_NODELAY (without it Nagle's algorithm
        // holds a response's last small frame for the client's delayed ACK,
        // ~40 ms) and TCP keepalive; the builder's own settings apply only
        // to a listener it binds itself.
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            server = server
                .tls_config(tls)
                .map_err(|e| StartupError::Tls("TLS_CERT", e.to_string()))?;
        }
        let serve = server
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // tonic's default, None, would override hyper's 200 and
            // advertise no limit at all.
            .max_concurrent_streams(Some(self.limits.http2_max_concurrent_streams))
            .layer(layers)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signalled);
        // In-flight calls finish, within the grace period.
        let grace = self.limits.shutdown_grace;
        tokio::pin!(serve);
        let result = tokio::select! {
            result = &mut serve => result,
            _ = async {
                let _ = shutdown_rx.await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "grace period over: in-flight calls cut short");
                Ok(())
            }
        };
        tracing::info!("stopped serving; in-flight calls finished");

        let _ = watcher.await;
        let _ = reloader.await;
        let _ = janitor.await;
        drop(self.pool);
        self.database.close().await?;
        result?;
        Ok(())
    }
}

/// Deletes, every hour, what no check needs any more: sessions ended or
/// expired a week ago (with their retired refresh tokens) and throttling
/// rows idle for a day. Every replica may run it; the deletes are idempotent.
async fn purge_old_rows(
    pool: Pool,
    refresh_ttl: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    const EVERY: Duration = Duration::from_secs(3600);
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let result = async {
            let mut conn = db::conn(&pool).await?;
            let sessions =
                db::sessions::purge_sessions(&mut conn, chrono::Duration::days(7)).await?;
            let failures = db::throttle::purge(&mut conn).await?;
            let ttl = chrono::Duration::from_std(refresh_ttl).unwrap_or(chrono::Duration::days(30));
            let retired = db::sessions::purge_retired(&mut conn, ttl).await?;
            let tokens = db::accounts::purge(&mut conn).await?;
            Ok::<_, Error>((sessions + retired + tokens, failures))
        }
        .await;
        match result {
            Ok((0, 0)) => {}
            Ok((sessions, failures)) => tracing::info!(sessions, failures, "purged old rows"),
            Err(e) => tracing::warn!(error = %e, "purge failed; next try in an hour"),
        }
    }
}

/// The TLS settings: `TLS_CERT` and `TLS_KEY` (with `TLS_CLIENT_CA`, mutual
/// TLS); `None` for plaintext h2c.
fn tls_config(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, StartupError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |var: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| StartupError::Tls(var, format!("{}: {e}", path.display())))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("TLS_CERT", cert)?,
        read("TLS_KEY", key)?,
    ));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("TLS_CLIENT_CA", ca)?));
    }
    Ok(Some(tls))
}

/// Re-reads `KEYS_DIR` on SIGHUP and every `KEYS_RELOAD_INTERVAL`, so that
/// `identity keys rotate` (or a key mounted from a secret store) takes effect
/// without a restart: the newest key signs, every key still in the folder
/// verifies, and a key removed from it stops verifying.
async fn reload_keys(
    source: KeysSource,
    tokens: TokenIssuer,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; keys reload on a timer only");
            None
        }
    };
    let mut tick = tokio::time::interval(source.interval);
    tick.tick().await;
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = hup => tracing::info!("SIGHUP received: reloading keys"),
            _ = stopped.changed() => return,
        }
        let (dir, alg, delay) = (
            source.dir.clone(),
            source.algorithm,
            source.activation_delay,
        );
        match tokio::task::spawn_blocking(move || KeyStore::load(&dir, alg, delay)).await {
            Ok(Ok(keys)) => {
                let signing = keys.signing().kid.clone();
                let count = keys.keys().len();
                if tokens.replace_keys(keys) {
                    tracing::info!(signing_kid = %signing, keys = count, "keys reloaded");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "keys not reloaded; the current ones stay"),
            Err(e) => tracing::error!(error = %e, "keys not reloaded"),
        }
    }
}

/// A database URL fit for a log line: user, hosts, ports and database only,
/// whatever form the URL takes (URL or key=value, password anywhere in it).
pub fn mask_password(url: &str) -> String {
    use tokio_postgres::config::Host;
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

/// The names the health service answers for, beside "" (the whole server).
fn service_names() -> [&'static str; 4] {
    [
        <pb::account_service_server::AccountServiceServer<AccountsGrpc> as NamedService>::NAME,
        <pb::user_service_server::UserServiceServer<UsersGrpc> as NamedService>::NAME,
        <pb::group_service_server::GroupServiceServer<GroupsGrpc> as NamedService>::NAME,
        <pb::auth_service_server::AuthServiceServer<AuthGrpc> as NamedService>::NAME,
    ]
}

/// Keeps the health status in step with the database: NOT_SERVING while it
/// cannot be reached, SERVING again when it returns, without a restart.
async fn watch_database(
    mut prober: Prober,
    reporter: HealthReporter,
    mut last: ServingStatus,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = stopped.changed() => return,
        }
        last = report_database(&mut prober, &reporter, Some(last)).await;
    }
}

/// The health check's own connection: a pool that is merely busy (every
/// connection in use at peak load) must not read as a database that is down.
struct Prober {
    url: String,
    conn: Option<diesel_async::AsyncPgConnection>,
}

impl Prober {
    fn new(url: String) -> Self {
        Self { url, conn: None }
    }

    async fn ping(&mut self) -> Result<(), Error> {
        use diesel_async::{AsyncConnection, SimpleAsyncConnection};
        const PATIENCE: Duration = Duration::from_secs(2);
        let unavailable = |e: Box<dyn std::error::Error + Send + Sync>| Error::Unavailable(e);
        if self.conn.is_none() {
            let conn = tokio::time::timeout(
                PATIENCE,
                diesel_async::AsyncPgConnection::establish(&self.url),
            )
            .await
            .map_err(|e| unavailable(Box::new(e)))?
            .map_err(|e| unavailable(Box::new(e)))?;
            self.conn = Some(conn);
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| Error::internal("no probe connection"))?;
        let result = tokio::time::timeout(PATIENCE, conn.batch_execute("SELECT 1")).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(unavailable(Box::new(e)))
            }
            Err(e) => {
                self.conn = None;
                Err(unavailable(Box::new(e)))
            }
        }
    }
}

/// Pings the database and publishes the result when it changed from `last`.
async fn report_database(
    prober: &mut Prober,
    reporter: &HealthReporter,
    last: Option<ServingStatus>,
) -> ServingStatus {
    let status = match prober.ping().await {
        Ok(()) => ServingStatus::Serving,
        Err(e) => {
            if last != Some(ServingStatus::NotServing) {
                tracing::warn!(error = %e, "database unreachable: health is NOT_SERVING");
            }
            ServingStatus::NotServing
        }
    };
    if last != Some(status) {
        if last.is_some() && status == ServingStatus::Serving {
            tracing::info!("database reachable again: health is SERVING");
        }
        reporter.set_service_status("", status).await;
        for name in service_names() {
            reporter.set_service_status(name, status).await;
        }
    }
    status
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
