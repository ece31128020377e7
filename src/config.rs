//! Every setting of the service, in one place.
//!
//! Each setting is an environment variable; a command-line flag of the same
//! meaning overrides it (`--listen-addr` for `LISTEN_ADDR`, and so on). Values
//! are parsed and checked here, before anything starts, so that a bad one
//! stops the program at once with a line naming the variable (exit code 2).
//! The README's configuration table mirrors this file.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

/// Settings of `identity serve`, shared by the subcommands that need them.
/// Its `Debug` hides the database URL and the Sentry DSN (both may hold
/// credentials).
#[derive(Clone, Args)]
pub struct Config {
    /// PostgreSQL URL. Unset: an embedded cluster under DATA_DIR, started and
    /// stopped by the service itself.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// Where the embedded PostgreSQL cluster lives.
    #[arg(
        long,
        global = true,
        env = "DATA_DIR",
        value_name = "DATA_DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,

    /// Address for gRPC and HTTP (h2c and HTTP/1.1) on one port.
    #[arg(
        long,
        global = true,
        env = "LISTEN_ADDR",
        value_name = "LISTEN_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub listen_addr: SocketAddr,

    /// Folder of the PEM signing keys; generated on first start when empty.
    #[arg(
        long,
        global = true,
        env = "KEYS_DIR",
        value_name = "KEYS_DIR",
        default_value = "./keys"
    )]
    pub keys_dir: PathBuf,

    /// Runtime worker threads (default: the number of cores).
    #[arg(
        long,
        global = true,
        env = "WEB_CONCURRENCY",
        value_name = "WEB_CONCURRENCY"
    )]
    pub web_concurrency: Option<NonZeroUsize>,

    /// Database connections in the pool (default: 2 x worker threads).
    #[arg(long, global = true, env = "DB_POOL_SIZE", value_name = "DB_POOL_SIZE",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub db_pool_size: Option<u32>,

    /// Lifetime of access tokens (humantime: `15m`, `1h`, `90s`).
    #[arg(long, global = true, env = "ACCESS_TOKEN_TTL", value_name = "ACCESS_TOKEN_TTL",
          default_value = "15m", value_parser = parse_ttl)]
    pub access_token_ttl: Duration,

    /// Lifetime of refresh tokens and so of an idle session.
    #[arg(long, global = true, env = "REFRESH_TOKEN_TTL", value_name = "REFRESH_TOKEN_TTL",
          default_value = "30d", value_parser = parse_ttl)]
    pub refresh_token_ttl: Duration,

    /// Signing algorithm of access tokens. Shared-secret algorithms (HS*) are
    /// refused on purpose: every verifier would hold the signing key.
    #[arg(
        long,
        global = true,
        env = "JWT_ALGORITHM",
        value_name = "JWT_ALGORITHM",
        default_value = "EdDSA",
        value_enum,
        ignore_case = false
    )]
    pub jwt_algorithm: JwtAlgorithm,

    /// The `iss` claim of access tokens.
    #[arg(long, global = true, env = "JWT_ISSUER", value_name = "JWT_ISSUER", default_value = "identity",
          value_parser = non_empty)]
    pub jwt_issuer: String,

    /// The `aud` claim of access tokens.
    #[arg(long, global = true, env = "JWT_AUDIENCE", value_name = "JWT_AUDIENCE", default_value = "identity",
          value_parser = non_empty)]
    pub jwt_audience: String,

    /// Whether anonymous callers may create (register) users.
    #[arg(long, global = true, env = "ALLOW_REGISTRATION", value_name = "ALLOW_REGISTRATION",
          default_value = "true", action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub allow_registration: bool,

    /// Whether Login refuses users whose email is not verified
    /// (FAILED_PRECONDITION, EMAIL_NOT_VERIFIED), after a correct password.
    #[arg(long, global = true, env = "REQUIRE_VERIFIED_LOGIN", value_name = "REQUIRE_VERIFIED_LOGIN",
          default_value = "false", action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub require_verified_login: bool,

    /// Whether superuser-only calls (and a superuser's powers in any call)
    /// need a session that a second factor proved: PERMISSION_DENIED with
    /// reason MFA_REQUIRED otherwise. API keys are not sessions and keep
    /// their user's powers.
    #[arg(long, global = true, env = "REQUIRE_MFA_FOR_SUPERUSERS", value_name = "REQUIRE_MFA_FOR_SUPERUSERS",
          default_value = "false", action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub require_mfa_for_superusers: bool,

    /// The 32-byte key (raw, mode 0600) that encrypts TOTP secrets at rest
    /// (AES-256-GCM); made on first start when missing. Default:
    /// `KEYS_DIR/mfa.key`.
    #[arg(long, global = true, env = "MFA_KEY_FILE", value_name = "MFA_KEY_FILE")]
    pub mfa_key_file: Option<PathBuf>,

    /// Earlier MFA keys (comma-separated files), still opening the secrets
    /// they sealed, after a rotation of MFA_KEY_FILE; each secret is
    /// sealed again with the current key when next used.
    #[arg(
        long,
        global = true,
        env = "MFA_PREVIOUS_KEY_FILES",
        value_name = "MFA_PREVIOUS_KEY_FILES",
        value_delimiter = ','
    )]
    pub mfa_previous_key_files: Vec<PathBuf>,

    /// Lifetime of email verification tokens.
    #[arg(long, global = true, env = "EMAIL_VERIFICATION_TTL", value_name = "EMAIL_VERIFICATION_TTL",
          default_value = "24h", value_parser = parse_ttl)]
    pub email_verification_ttl: Duration,

    /// Lifetime of password reset tokens.
    #[arg(long, global = true, env = "PASSWORD_RESET_TTL", value_name = "PASSWORD_RESET_TTL",
          default_value = "1h", value_parser = parse_ttl)]
    pub password_reset_ttl: Duration,

    /// Sentry DSN; reporting is off when unset.
    #[arg(long, global = true, env = "SENTRY_DSN", value_name = "SENTRY_DSN", hide_env_values = true,
          value_parser = parse_dsn)]
    pub sentry_dsn: Option<String>,

    /// Log format: `text` for people, `json` for machines.
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        default_value = "text",
        value_enum
    )]
    pub log_format: LogFormat,

    /// argon2id memory cost in KiB (OWASP: 19456).
    #[arg(long, global = true, env = "ARGON2_MEMORY_KIB", value_name = "ARGON2_MEMORY_KIB", default_value = "19456",
          value_parser = clap::value_parser!(u32).range(8..=4_194_304))]
    pub argon2_memory_kib: u32,

    /// argon2id iterations (OWASP: 2).
    #[arg(long, global = true, env = "ARGON2_ITERATIONS", value_name = "ARGON2_ITERATIONS", default_value = "2",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub argon2_iterations: u32,

    /// argon2id lanes (OWASP: 1).
    #[arg(long, global = true, env = "ARGON2_PARALLELISM", value_name = "ARGON2_PARALLELISM", default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub argon2_parallelism: u32,

    /// Password hashes computed at once (default: half the cores, at least
    /// one, so that a flood of logins leaves cores for everything else). More
    /// requests wait in a queue; see HASH_QUEUE.
    #[arg(
        long,
        global = true,
        env = "HASH_CONCURRENCY",
        value_name = "HASH_CONCURRENCY"
    )]
    pub hash_concurrency: Option<NonZeroUsize>,

    /// Requests that may wait for a hashing slot before new ones are refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        global = true,
        env = "HASH_QUEUE",
        value_name = "HASH_QUEUE",
        default_value = "256",
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub hash_queue: u32,

    /// The longest a call may take on the server; a client's shorter
    /// `grpc-timeout` wins. Past it the call is cancelled (DEADLINE_EXCEEDED).
    #[arg(long, global = true, env = "REQUEST_TIMEOUT", value_name = "REQUEST_TIMEOUT",
          default_value = "30s", value_parser = parse_ttl)]
    pub request_timeout: Duration,

    /// Calls served at once, across all connections; more are refused at once
    /// with RESOURCE_EXHAUSTED rather than queued.
    #[arg(long, global = true, env = "MAX_CONCURRENT_REQUESTS", value_name = "MAX_CONCURRENT_REQUESTS",
          default_value = "1024", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_requests: u32,

    /// Server streams open at once across all connections: health Watch,
    /// reflection, and every RPC that streams (its descriptor says so). More
    /// are refused at once with RESOURCE_EXHAUSTED. Streams do not count
    /// against MAX_CONCURRENT_REQUESTS, do not end at REQUEST_TIMEOUT, and
    /// end with OK when the service shuts down.
    #[arg(long, global = true, env = "MAX_STREAMS", value_name = "MAX_STREAMS",
          default_value = "1024", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams: u32,

    /// Requests a client may have in flight at once on one HTTP/2
    /// connection: the SETTINGS_MAX_CONCURRENT_STREAMS the server advertises
    /// (RFC 9113, 6.5.2). A client past it waits or opens another connection.
    #[arg(long, global = true, env = "HTTP2_MAX_CONCURRENT_STREAMS", value_name = "HTTP2_MAX_CONCURRENT_STREAMS",
          default_value = "200", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http2_max_concurrent_streams: u32,

    /// Server certificate chain (PEM) for TLS; plaintext h2c when unset (for
    /// a mesh sidecar to wrap).
    #[arg(
        long,
        global = true,
        env = "TLS_CERT",
        value_name = "TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "TLS_KEY",
        value_name = "TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to: mutual
    /// TLS, every client must present one.
    #[arg(
        long,
        global = true,
        env = "TLS_CLIENT_CA",
        value_name = "TLS_CLIENT_CA",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// After SIGTERM, how long in-flight calls may take to finish before the
    /// service exits anyway.
    #[arg(long, global = true, env = "SHUTDOWN_GRACE", value_name = "SHUTDOWN_GRACE",
          default_value = "30s", value_parser = parse_ttl)]
    pub shutdown_grace: Duration,

    /// How old a new key must be before it signs (it verifies at once): at
    /// least KEYS_RELOAD_INTERVAL plus how long verifiers cache the JWKS, so
    /// that no replica or verifier meets a token of a key it does not know
    /// yet. 30 minutes covers Istio's sidecars (a JWKS every 20 minutes, no
    /// refetch on an unknown kid) and Envoy's remote_jwks (10 minutes).
    #[arg(long, global = true, env = "KEYS_ACTIVATION_DELAY", value_name = "KEYS_ACTIVATION_DELAY",
          default_value = "30m", value_parser = parse_delay)]
    pub keys_activation_delay: Duration,

    /// How often KEYS_DIR is re-read (SIGHUP re-reads it at once).
    #[arg(long, global = true, env = "KEYS_RELOAD_INTERVAL", value_name = "KEYS_RELOAD_INTERVAL",
          default_value = "60s", value_parser = parse_ttl)]
    pub keys_reload_interval: Duration,

    /// How long the change feed keeps changes (the audit trail); a cursor
    /// older than this is refused with CURSOR_EXPIRED. Purged hourly.
    #[arg(long, global = true, env = "CHANGES_RETENTION", value_name = "CHANGES_RETENTION",
          default_value = "7d", value_parser = parse_ttl)]
    pub changes_retention: Duration,

    /// The longest a WatchChanges stream goes without a response: when
    /// nothing changes, a heartbeat with the current cursor.
    #[arg(long, global = true, env = "CHANGES_HEARTBEAT", value_name = "CHANGES_HEARTBEAT",
          default_value = "10s", value_parser = parse_heartbeat)]
    pub changes_heartbeat: Duration,

    /// `on`: VerifyToken, the Envoy check and the bearer check of every call
    /// answer from memory kept fresh by the change feed (never staler than
    /// the feed's delivery, and never while the feed is unheard); `off`:
    /// one database read each.
    #[arg(long, global = true, env = "VERIFY_CACHE", value_name = "VERIFY_CACHE",
          default_value = "on", action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub verify_cache: bool,

    /// `on`: one line per call at info, target `identity::access` (RPC,
    /// status code, duration, request id, caller, peer address, and the
    /// `x-forwarded-for` of a trusted proxy); `off`: none.
    #[arg(long, global = true, env = "ACCESS_LOG", value_name = "ACCESS_LOG",
          default_value = "on", action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub access_log: bool,

    /// Proxies (addresses or CIDR ranges, comma-separated) whose
    /// `x-forwarded-for` the access log records; from any other peer the
    /// header is ignored. Empty by default: no one's.
    #[arg(long, global = true, env = "TRUSTED_PROXIES", value_name = "TRUSTED_PROXIES",
          value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Where spans go, over OTLP/gRPC without TLS (`http://host:4317`: a
    /// collector or agent beside the service); unset: none are exported.
    /// Incoming W3C `traceparent` is continued, and its trace id logged,
    /// either way. The SDK reads `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*`.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "OTEL_EXPORTER_OTLP_ENDPOINT",
          value_parser = parse_otlp_endpoint)]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// The most sessions the verification cache keeps.
    #[arg(long, global = true, env = "VERIFY_CACHE_SIZE", value_name = "VERIFY_CACHE_SIZE",
          default_value = "100000", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub verify_cache_size: u32,

    /// Folder of the PostgreSQL server binaries for the embedded cluster
    /// (default: found on PATH or under /usr/lib/postgresql/*/bin).
    #[arg(long, global = true, env = "PG_BIN_DIR", value_name = "PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// A list of breached passwords to refuse wherever a password is set:
    /// Have I Been Pwned's SHA-1 list (`HASH:COUNT` lines) or the file
    /// `identity passwords build` makes of it (loaded in a fraction of the
    /// time). Read in full at start by `serve` and `createsuperuser`, kept
    /// in memory at 4 bytes an entry plus 4 MiB; a password not listed is
    /// refused by mistake with a probability of entries / 2^52 (2.2e-9 at
    /// 10 million). Unset: only the built-in check of common passwords. A
    /// missing or malformed file stops the start (exit code 2).
    #[arg(
        long,
        global = true,
        env = "BREACHED_PASSWORDS_FILE",
        value_name = "BREACHED_PASSWORDS_FILE"
    )]
    pub breached_passwords_file: Option<PathBuf>,
}

impl Config {
    /// MFA_KEY_FILE, or `KEYS_DIR/mfa.key`.
    pub fn mfa_key_path(&self) -> PathBuf {
        self.mfa_key_file
            .clone()
            .unwrap_or_else(|| self.keys_dir.join("mfa.key"))
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("Config")
            .field("database_url", &hidden(&self.database_url))
            .field("data_dir", &self.data_dir)
            .field("listen_addr", &self.listen_addr)
            .field("keys_dir", &self.keys_dir)
            .field("web_concurrency", &self.web_concurrency)
            .field("db_pool_size", &self.db_pool_size)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("refresh_token_ttl", &self.refresh_token_ttl)
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("allow_registration", &self.allow_registration)
            .field("sentry_dsn", &hidden(&self.sentry_dsn))
            .field("log_format", &self.log_format)
            .field("breached_passwords_file", &self.breached_passwords_file)
            .finish_non_exhaustive()
    }
}

/// The JWS algorithms identity signs with: asymmetric only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    /// Ed25519 (RFC 8037).
    #[value(name = "EdDSA")]
    EdDsa,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256.
    #[value(name = "ES256")]
    Es256,
}

impl JwtAlgorithm {
    /// The JWS name (RFC 7518 `alg`), exactly as `JWT_ALGORITHM` takes it
    /// and as GetPublicKeys and the JWKS show it: "EdDSA", "RS256", "ES256".
    /// Written out rather than taken from `Debug`, which is no contract.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

impl std::fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

impl Config {
    /// Parses settings from flags (and the environment for those not given),
    /// as `identity serve` would: for tests and embedding.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        use clap::Parser;
        let args = std::iter::once(std::ffi::OsString::from("identity"))
            .chain(args.into_iter().map(Into::into));
        Only::try_parse_from(args).map(|o| o.config)
    }

    /// Runtime worker threads: `WEB_CONCURRENCY` or the number of cores.
    pub fn worker_threads(&self) -> usize {
        self.web_concurrency
            .map(NonZeroUsize::get)
            .unwrap_or_else(available_cores)
    }

    /// Pool size: `DB_POOL_SIZE` or twice the worker threads.
    pub fn pool_size(&self) -> u32 {
        self.db_pool_size
            .unwrap_or_else(|| u32::try_from(self.worker_threads() * 2).unwrap_or(u32::MAX))
    }

    /// The argon2id parameters: `ARGON2_MEMORY_KIB`, `ARGON2_ITERATIONS`,
    /// `ARGON2_PARALLELISM`.
    pub fn hash_params(&self) -> crate::hashing::HashParams {
        crate::hashing::HashParams {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        }
    }

    /// Concurrent password hashes: `HASH_CONCURRENCY` or half the cores.
    pub fn hash_concurrency(&self) -> usize {
        self.hash_concurrency
            .map(NonZeroUsize::get)
            .unwrap_or_else(|| (available_cores() / 2).max(1))
    }
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration such as 15m or 30d ({e})"))?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    if d > Duration::from_secs(10 * 365 * 24 * 3600) {
        return Err("must be at most 10 years".into());
    }
    Ok(d)
}

fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration such as 10s or 500ms ({e})"))?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err("must be from 100ms to 1h".into());
    }
    Ok(d)
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration such as 0s or 6m ({e})"))?;
    if d > Duration::from_secs(30 * 24 * 3600) {
        return Err("must be at most 30 days".into());
    }
    Ok(d)
}

fn parse_dsn(s: &str) -> Result<String, String> {
    s.parse::<sentry::types::Dsn>()
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a Sentry DSN ({e})"))
}

/// `http://host:port`: the exporter speaks gRPC in plaintext (h2c).
fn parse_otlp_endpoint(s: &str) -> Result<String, String> {
    match s.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => Ok(s.to_owned()),
        Ok(uri) if uri.scheme_str() == Some("https") => Err(
            "https is not supported: use http:// to a collector or agent beside the service".into(),
        ),
        _ => Err("expected http://host:port".into()),
    }
}

/// An address (`10.0.0.7`, `::1`) or a CIDR range (`10.0.0.0/8`).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| "expected IP addresses or CIDR ranges, comma-separated".into())
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::from_args(args)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.access_token_ttl, Duration::from_secs(15 * 60));
        assert_eq!(c.refresh_token_ttl, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(c.jwt_algorithm, JwtAlgorithm::EdDsa);
        assert!(c.allow_registration);
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.pool_size() as usize, 2 * c.worker_threads());
        assert_eq!(c.max_streams, 1024);
        assert_eq!(c.changes_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.changes_heartbeat, Duration::from_secs(10));
        assert!(c.verify_cache);
        assert_eq!(c.verify_cache_size, 100_000);
        assert_eq!(c.http2_max_concurrent_streams, 200);
    }

    #[test]
    fn stream_limits_are_at_least_one() {
        for flag in ["--max-streams", "--http2-max-concurrent-streams"] {
            assert!(parse(&[flag, "0"]).is_err(), "{flag}");
            assert!(parse(&[flag, "many"]).is_err(), "{flag}");
            assert!(parse(&[flag, "1"]).is_ok(), "{flag}");
        }
    }

    #[test]
    fn a_bad_duration_is_refused() {
        assert!(parse(&["--access-token-ttl", "abc"]).is_err());
        assert!(parse(&["--access-token-ttl", "0s"]).is_err());
    }

    #[test]
    fn shared_secret_algorithms_are_refused() {
        assert!(parse(&["--jwt-algorithm", "HS256"]).is_err());
        assert!(parse(&["--jwt-algorithm", "none"]).is_err());
        assert_eq!(
            parse(&["--jwt-algorithm", "ES256"]).unwrap().jwt_algorithm,
            JwtAlgorithm::Es256
        );
    }

    #[test]
    fn algorithm_names_are_the_ones_jwt_algorithm_takes() {
        for (alg, name) in [
            (JwtAlgorithm::EdDsa, "EdDSA"),
            (JwtAlgorithm::Rs256, "RS256"),
            (JwtAlgorithm::Es256, "ES256"),
        ] {
            assert_eq!(alg.as_str(), name);
            assert_eq!(alg.to_string(), name);
            assert_eq!(
                parse(&["--jwt-algorithm", name]).unwrap().jwt_algorithm,
                alg
            );
        }
    }

    #[test]
    fn registration_can_be_closed() {
        assert!(
            !parse(&["--allow-registration", "false"])
                .unwrap()
                .allow_registration
        );
        assert!(parse(&["--allow-registration", "maybe"]).is_err());
    }
}
