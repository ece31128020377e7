//! Start-up and lifetime: [`Application::build`] checks the hashing
//! settings, prepares the database, builds the services and binds the
//! listener; [`Application::run_until_stopped`] serves until the shutdown
//! future resolves, lets in-flight calls finish, then stops the embedded
//! cluster. Binding before serving is what lets a test use port 0 and
//! connect at once, without sleeping.
//!
//! The tasks that live as long as the server are in files of their own:
//! `health.rs` (the database prober behind the health service), `keys.rs`
//! (the key reloader: SIGHUP and timer) and `janitor.rs` (the hourly
//! purge); where the data is, URL or embedded cluster, is `database.rs`.
//!
//! [`Application::build`]: crate::app::Application::build
//! [`Application::run_until_stopped`]: crate::app::Application::run_until_stopped

mod breached;
mod database;
mod health;
mod janitor;
mod keys;

pub use breached::load_breached;
pub use database::{Database, mask_password};

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::db::{self, Pool, embedded::EmbeddedError};
use crate::error::Error;
use crate::grpc::{
    AccountsGrpc, ApiKeysGrpc, AuthGrpc, ChangesGrpc, EnvoyGrpc, GroupsGrpc, UsersGrpc,
    authz::AuthLayer,
};
use crate::hashing::Hasher;

/// The shortest KEYS_ACTIVATION_DELAY that covers the JWKS caches of the
/// mesh's verifiers (Istio's 20 minutes, Envoy's 10, plus a replica's
/// reload); a shorter one is warned about at start.
const RECOMMENDED_ACTIVATION_DELAY: Duration = Duration::from_secs(30 * 60);
use crate::limits::{BodyLimitLayer, DeadlineLayer, Refusals, ShedLayer, StreamLimit};
use crate::proto::{self, identity::v1 as pb};
use crate::service::{AccountService, AuthService, ChangeService, GroupService, UserService};
use crate::token::{KeyStore, TokenIssuer, keys::KeyError};

use health::{Health, Prober, report_database, watch_database};
use janitor::purge_old_rows;
use keys::reload_keys;

/// Why the service could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The embedded cluster failed.
    #[error("embedded PostgreSQL: {0}")]
    Embedded(#[from] EmbeddedError),
    /// `DATABASE_URL` cannot be used as it is written.
    #[error("DATABASE_URL: {0}")]
    DatabaseUrl(#[from] crate::db::connect::UrlError),
    /// The database of `DATABASE_URL` (shown without its password) does not
    /// let this process connect.
    #[error("DATABASE_URL {0}: cannot connect")]
    DatabaseConnect(String, #[source] diesel::ConnectionError),
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
    /// A setting whose value passed its parser but failed at start (a
    /// file that cannot be used): the program exits with code 2, as for a
    /// value refused when parsed.
    #[error("{0}: {1}")]
    Setting(&'static str, String),
    /// What the command was given (a username, a password, an option's
    /// value) broke a rule checked before any work: exit code 2, as for a
    /// bad setting.
    #[error("{0}")]
    Input(String),
    /// Something else.
    #[error("{0}")]
    Other(String),
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
    changes: ChangeService,
    cache: Option<crate::service::fresh::FreshCache>,
    registration_open: bool,
    breached: crate::domain::BreachedList,
    limits: Limits,
    keys: KeysSource,
    metrics: crate::metrics::Metrics,
    access_log: Option<crate::telemetry::AccessLog>,
    traced: bool,
    require_mfa_for_superusers: bool,
    streams: StreamLimit,
    refusals: Refusals,
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
    changes_retention: Duration,
    refresh_ttl: Duration,
    request_timeout: Duration,
    shutdown_grace: Duration,
    max_concurrent_requests: usize,
    http2_max_concurrent_streams: u32,
}

/// Where it listens, whether registration is open, whether TLS is on; the
/// pool, services, keys and the database (whose URL may hold a password)
/// are left out.
impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("local_addr", &self.local_addr)
            .field("registration_open", &self.registration_open)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The largest request message: 64 KiB is far above any valid request.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

impl Application {
    /// Opens the database, applies pending migrations, builds the services
    /// and binds `LISTEN_ADDR`.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        // Every RESOURCE_EXHAUSTED of this server, counted by cause.
        let refusals = Refusals::default();
        // First: settings argon2 refuses together fail before any database
        // work, with a message of their own.
        let hasher = Hasher::new(
            config.hash_params(),
            config.hash_concurrency(),
            config.hash_queue as usize,
        )?
        .counting(refusals.clone());
        // Before the database too: a bad file fails the start at once, and
        // nothing is started that would have to be stopped.
        let breached = load_breached(config).await?;
        // A bad MFA key file is a bad setting: refused before the database.
        let mfa = mfa_keys(config)?;
        let database = Database::open(config).await?;
        let applied = db::migrations::run_pending(&database.url)
            .await
            .map_err(|e| StartupError::Database(e.into()))?;
        if !applied.is_empty() {
            tracing::info!(
                migrations = %crate::telemetry::List(&applied),
                "applied migrations"
            );
        }
        let pool = db::pool(&database.url, config.pool_size())
            .map_err(|e| StartupError::Database(e.into()))?;
        let keys_dir = config.keys_dir.clone();
        let alg = config.jwt_algorithm;
        let delay = config.keys_activation_delay;
        if delay < RECOMMENDED_ACTIVATION_DELAY {
            tracing::warn!(
                keys_activation_delay = %humantime::format_duration(delay),
                recommended = "30m",
                "KEYS_ACTIVATION_DELAY is shorter than the JWKS caches of Istio's sidecars \
                 (20 minutes, no refetch on an unknown kid) and Envoy's remote_jwks (10 minutes): \
                 after a rotation they may refuse new tokens until they refetch (docs/tokens.md)"
            );
        }
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
        let streams = StreamLimit::new(config.max_streams as usize, refusals.clone());
        let feed_metrics = crate::service::changes::FeedMetrics::new()
            .map_err(|e| StartupError::Other(format!("metrics: {e}")))?;
        let metrics = crate::metrics::Metrics::new(
            crate::metrics::Readings {
                pool: pool.clone(),
                hasher: hasher.clone(),
                streams: streams.clone(),
                tokens: tokens.clone(),
                refusals: refusals.clone(),
            },
            &feed_metrics,
        )
        .map_err(|e| StartupError::Other(format!("metrics: {e}")))?;
        let cache_metrics = crate::service::fresh::CacheMetrics::new()
            .map_err(|e| StartupError::Other(format!("metrics: {e}")))?;
        for collector in cache_metrics.collectors() {
            metrics
                .register(collector)
                .map_err(|e| StartupError::Other(format!("metrics: {e}")))?;
        }
        let cache = config.verify_cache.then(|| {
            crate::service::fresh::FreshCache::new(config.verify_cache_size as usize, cache_metrics)
        });
        let mut changes = ChangeService::new(pool.clone(), config.changes_heartbeat, feed_metrics);
        if let Some(cache) = &cache {
            changes = changes.with_cache(cache.clone());
        }
        let users = UserService::new(pool.clone(), hasher.clone());
        let accounts = AccountService::new(
            pool.clone(),
            hasher.clone(),
            config.email_verification_ttl,
            config.password_reset_ttl,
        )
        .with_refusals(refusals.clone());
        let auth = AuthService::new(
            pool.clone(),
            hasher,
            tokens,
            config.refresh_token_ttl,
            config.request_timeout,
        )
        .require_verified_login(config.require_verified_login)
        .with_refusals(refusals.clone())
        .with_mfa(std::sync::Arc::new(mfa));
        let auth = match &cache {
            Some(cache) => auth.with_cache(cache.clone()),
            None => auth,
        };
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
            kids = %crate::telemetry::List(&kids),
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
            changes,
            cache,
            registration_open: config.allow_registration,
            breached,
            metrics,
            access_log: config
                .access_log
                .then(|| crate::telemetry::AccessLog::new(&config.trusted_proxies)),
            traced: config.otel_exporter_otlp_endpoint.is_some(),
            require_mfa_for_superusers: config.require_mfa_for_superusers,
            streams,
            refusals,
            tls: tls_config(config)?,
            keys: KeysSource {
                activation_delay: config.keys_activation_delay,
                dir: config.keys_dir.clone(),
                algorithm: config.jwt_algorithm,
                interval: config.keys_reload_interval,
            },
            limits: Limits {
                changes_retention: config.changes_retention,
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
            .register_encoded_file_descriptor_set(proto::ENVOY_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartupError::Other(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(proto::ENVOY_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartupError::Other(e.to_string()))?;

        // The first look at the database happens before serving, so that
        // every service name is registered by the first health call.
        let mut prober = Prober::new(self.database.url.clone());
        let health_status = Health::new(reporter, self.metrics.health());
        let first = report_database(&mut prober, &health_status, None).await;
        let (stop_health, health_stopped) = tokio::sync::watch::channel(false);
        let janitor = tokio::spawn(purge_old_rows(
            self.pool.clone(),
            self.limits.refresh_ttl,
            self.limits.changes_retention,
            health_stopped.clone(),
        ));
        let listener = tokio::spawn(
            self.changes
                .clone()
                .listen(self.database.url.clone(), health_stopped.clone()),
        );
        let announcer = tokio::spawn(
            self.changes
                .clone()
                .announce_commits(health_stopped.clone()),
        );
        let announces = self.changes.announcer();
        let follower = self.cache.clone().map(|cache| {
            tokio::spawn(cache.follow(
                self.database.url.clone(),
                self.changes.heard(),
                health_stopped.clone(),
            ))
        });
        let reloader = tokio::spawn(reload_keys(
            self.keys.clone(),
            self.pool.clone(),
            self.auth.tokens().clone(),
            self.metrics.key_reload_failures(),
            health_stopped.clone(),
        ));
        let refusal_log = tokio::spawn(self.refusals.clone().report(health_stopped.clone()));
        let draining = health_status.clone();
        let watcher = tokio::spawn(watch_database(prober, health_status, first, health_stopped));

        let mut routes = tonic::service::Routes::builder();
        routes
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(pb::user_service_server::UserServiceServer::new(
                UsersGrpc::new(self.users, self.registration_open, self.breached.clone()),
            ))
            .add_service(pb::group_service_server::GroupServiceServer::new(
                GroupsGrpc::new(self.groups),
            ))
            .add_service(pb::auth_service_server::AuthServiceServer::new(
                AuthGrpc::new(self.auth.clone(), self.breached.clone()),
            ))
            .add_service(pb::account_service_server::AccountServiceServer::new(
                AccountsGrpc::new(self.accounts, self.breached),
            ))
            .add_service(pb::api_key_service_server::ApiKeyServiceServer::new(
                ApiKeysGrpc::new(self.auth.clone()),
            ))
            .add_service(pb::change_service_server::ChangeServiceServer::new(
                ChangesGrpc::new(self.changes),
            ))
            .add_service(envoy_types::ext_authz::v3::pb::AuthorizationServer::new(
                EnvoyGrpc::new(self.auth.clone()),
            ));
        let http = crate::http::routes(
            self.auth.tokens().clone(),
            self.metrics.clone(),
            self.tls.is_some(),
        );
        let routes = tonic::service::Routes::from(routes.routes().into_axum_router().merge(http));

        let layers = tower::ServiceBuilder::new()
            .layer(crate::telemetry::RequestContextLayer::new(self.traced))
            .layer(crate::metrics::MetricsLayer::new(
                self.metrics.clone(),
                self.access_log.clone(),
            ))
            // Streams first: they are exempt from the two below.
            .layer(self.streams.layer())
            .layer(ShedLayer::new(
                self.limits.max_concurrent_requests,
                self.refusals.clone(),
            ))
            .layer(DeadlineLayer::new(self.limits.request_timeout))
            .layer(BodyLimitLayer::new(
                MAX_MESSAGE_BYTES + 5,
                self.refusals.clone(),
            ))
            .layer(
                AuthLayer::new(self.auth, announces)
                    .require_mfa_for_superusers(self.require_mfa_for_superusers),
            );
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let streams = self.streams.clone();
        let signalled = async move {
            shutdown.await;
            tracing::info!("shutting down: no new calls, waiting for those in flight");
            // Tell load balancers at once; the background tasks stop too.
            let _ = stop_health.send(true);
            draining.set(ServingStatus::NotServing).await;
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
        let _ = refusal_log.await;
        let _ = janitor.await;
        let _ = listener.await;
        let _ = announcer.await;
        if let Some(follower) = follower {
            let _ = follower.await;
        }
        drop(self.pool);
        self.database.close().await?;
        result?;
        Ok(())
    }
}

/// The key that seals TOTP secrets (MFA_KEY_FILE, made on first start),
/// with the earlier ones of MFA_PREVIOUS_KEY_FILES; a bad file is a bad
/// setting (exit 2, naming the variable).
fn mfa_keys(config: &Config) -> Result<crate::token::mfa_key::MfaKeys, StartupError> {
    use crate::token::mfa_key::MfaKeys;
    let keys = MfaKeys::load_or_generate(&config.mfa_key_path())
        .map_err(|e| StartupError::Setting("MFA_KEY_FILE", e.to_string()))?;
    keys.load_previous(&config.mfa_previous_key_files)
        .map_err(|e| StartupError::Setting("MFA_PREVIOUS_KEY_FILES", e.to_string()))
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
