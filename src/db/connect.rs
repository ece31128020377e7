//! Connections to PostgreSQL, with TLS as libpq does it: `sslmode` and
//! `sslrootcert` in `DATABASE_URL` (URL query or `key=value` form) keep
//! libpq's meanings, through rustls (`tokio-postgres-rustls`). Every
//! connection the service opens comes from [`establish`]: the pool's, the
//! health prober's, the change feed's listener's and the commands'.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow` | only if plaintext is refused | not checked |
//! | `prefer` (default) | when the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert` given, as `verify-ca` |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` |
//! | `verify-full` | always | as `verify-ca`, and made for the host name connected to |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the
//! operating system's store; without it, `verify-ca` and `verify-full` read
//! `~/.postgresql/root.crt`, as libpq does. A Unix socket never speaks TLS
//! (PostgreSQL offers none there), whatever the mode.

use std::path::PathBuf;
use std::sync::Arc;

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, danger};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::{Host, SslMode as PgSslMode};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first; TLS if the server refuses it.
    Allow,
    /// TLS when the server offers it (libpq's default).
    Prefer,
    /// TLS, without checking who answers.
    Require,
    /// TLS with a certificate signed by a trusted CA.
    VerifyCa,
    /// As `VerifyCa`, for the host name connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, UrlError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(UrlError(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// Why a `DATABASE_URL` cannot be used; the message never holds the URL (it
/// may carry a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

/// Where the trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's store (`sslrootcert=system`).
    System,
}

/// A `DATABASE_URL` read once: what tokio-postgres connects to and how TLS
/// is done.
#[derive(Clone)]
pub struct Target {
    pg: tokio_postgres::Config,
    mode: SslMode,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Reads `url`, and the CA file it names, so that every problem with
    /// them shows at start rather than at the first connection.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let (rest, ssl) = split_ssl_options(url)?;
        let mut pg: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| {
            // tokio-postgres's message names the option, never its value.
            UrlError(format!("not a PostgreSQL connection string ({e})"))
        })?;
        let mode = match &ssl.mode {
            Some(mode) => SslMode::parse(mode)?,
            None => SslMode::Prefer,
        };
        let roots = match ssl.root_cert.as_deref() {
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(PathBuf::from(path))),
            None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                let home = std::env::var_os("HOME").ok_or_else(|| {
                    UrlError(format!(
                        "sslmode={} needs sslrootcert (and HOME is unset, so ~/.postgresql/root.crt cannot be the default)",
                        ssl.mode.as_deref().unwrap_or_default()
                    ))
                })?;
                Some(Roots::File(
                    PathBuf::from(home).join(".postgresql/root.crt"),
                ))
            }
            None => None,
        };
        let unix_only =
            !pg.get_hosts().is_empty() && pg.get_hosts().iter().all(|h| !matches!(h, Host::Tcp(_)));
        let tls = if mode == SslMode::Disable || unix_only {
            None
        } else {
            Some(Arc::new(client_config(mode, roots.as_ref())?))
        };
        pg.ssl_mode(match (mode, &tls) {
            (_, None) | (SslMode::Disable, _) => PgSslMode::Disable,
            (SslMode::Allow | SslMode::Prefer, _) => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        Ok(Self { pg, mode, tls })
    }

    /// The `sslmode` in force.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// Opens a connection.
    pub async fn connect(&self) -> Result<AsyncPgConnection, ConnectionError> {
        match (&self.tls, self.mode) {
            (None, _) => plain(&self.pg).await,
            (Some(tls), SslMode::Allow) => match plain(&self.pg).await {
                Ok(conn) => Ok(conn),
                Err(_) => {
                    let mut pg = self.pg.clone();
                    pg.ssl_mode(PgSslMode::Require);
                    secure(&pg, tls).await
                }
            },
            (Some(tls), _) => secure(&self.pg, tls).await,
        }
    }
}

/// Opens a connection to `url` (see [`Target`]).
pub async fn establish(url: &str) -> Result<AsyncPgConnection, ConnectionError> {
    let target = Target::parse(url).map_err(|e| ConnectionError::BadConnection(e.0))?;
    target.connect().await
}

async fn plain(pg: &tokio_postgres::Config) -> Result<AsyncPgConnection, ConnectionError> {
    let mut pg = pg.clone();
    pg.ssl_mode(PgSslMode::Disable);
    let (client, connection) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(connect_error)?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

async fn secure(
    pg: &tokio_postgres::Config,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<AsyncPgConnection, ConnectionError> {
    let make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
    let (client, connection) = pg.connect(make).await.map_err(connect_error)?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

/// tokio-postgres's error with its causes on one line ("error performing
/// TLS handshake: invalid peer certificate: ...").
fn connect_error(e: tokio_postgres::Error) -> ConnectionError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    ConnectionError::BadConnection(message)
}

/// The rustls client configuration of a mode.
fn client_config(mode: SslMode, roots: Option<&Roots>) -> Result<rustls::ClientConfig, UrlError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| UrlError(format!("TLS: {e}")))?;
    // libpq: `require` with a root certificate given checks the chain.
    let verify = match (mode, roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, _) | (SslMode::Require, Some(_)) => roots,
        _ => None,
    };
    let config = match verify {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
            .with_no_client_auth(),
        Some(roots) => {
            let store = Arc::new(root_store(roots)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(store.clone(), provider)
                .build()
                .map_err(|e| UrlError(format!("sslrootcert: {e}")))?;
            if mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(config)
}

fn root_store(roots: &Roots) -> Result<rustls::RootCertStore, UrlError> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| UrlError(format!("sslrootcert {shown}: {e}")))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| UrlError(format!("sslrootcert {shown}: {e}")))?;
            if certs.is_empty() {
                return Err(UrlError(format!(
                    "sslrootcert {shown}: no PEM certificate in it"
                )));
            }
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| UrlError(format!("sslrootcert {shown}: {e}")))?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(UrlError(
                    "sslrootcert=system: the operating system's store holds no certificate".into(),
                ));
            }
        }
    }
    Ok(store)
}

/// The options of the URL that tokio-postgres does not read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SslOptions {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of `url` (either form), leaving
/// what tokio-postgres reads. Client certificates (`sslcert`, `sslkey`)
/// are refused by name rather than ignored.
pub(crate) fn split_ssl_options(url: &str) -> Result<(String, SslOptions), UrlError> {
    let mut ssl = SslOptions::default();
    let mut take = |key: &str, value: String| -> Result<bool, UrlError> {
        match key {
            "sslmode" => ssl.mode = Some(value),
            "sslrootcert" => ssl.root_cert = Some(value),
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(UrlError(format!(
                    "{key}: client certificates are not supported"
                )));
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), ssl));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(key), percent_decode(value))? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, ssl));
    }
    // key=value form: values bare or single-quoted, with backslash escapes.
    let mut rest = String::new();
    let mut chars = url.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(UrlError(format!(
                "not a PostgreSQL connection string (no = after {key:?})"
            )));
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek().is_some_and(|(_, c)| *c == '\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some((_, '\\')) => {
                        if let Some((_, c)) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some((_, '\'')) => break,
                    Some((_, c)) => value.push(c),
                    None => {
                        return Err(UrlError(
                            "not a PostgreSQL connection string (unterminated quote)".into(),
                        ));
                    }
                }
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some((_, c)) = chars.next() {
                        value.push(c);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        let end = chars.peek().map_or(url.len(), |(i, _)| *i);
        if !take(&key, value)? {
            rest.push_str(&url[start..end]);
            rest.push(' ');
        }
    }
    Ok((rest.trim_end().to_owned(), ssl))
}

/// `%XX` decoding of a URL query part (`+` is left alone, as libpq does).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `verify-ca`: the chain to a trusted CA is checked, the name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last: a name error
        // means the chain held.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a CA: encryption against a passive
/// listener, no check of who answers (libpq's meaning). The handshake's
/// signatures are still verified.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl danger::ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, SslOptions) {
        split_ssl_options(url).unwrap()
    }

    #[test]
    fn ssl_options_leave_the_url_form() {
        let (rest, ssl) = split(
            "postgres://app:pw@db:5432/identity?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        );
        assert_eq!(
            rest,
            "postgres://app:pw@db:5432/identity?application_name=x"
        );
        assert_eq!(ssl.mode.as_deref(), Some("verify-full"));
        assert_eq!(ssl.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (rest, ssl) = split("postgresql://db/identity?sslmode=require");
        assert_eq!(rest, "postgresql://db/identity");
        assert_eq!(ssl.mode.as_deref(), Some("require"));
        assert_eq!(split("postgres://db/x").0, "postgres://db/x");
    }

    #[test]
    fn ssl_options_leave_the_key_value_form() {
        let (rest, ssl) = split(
            r"host=db user=app password='a \' b' sslmode = verify-ca sslrootcert='/my certs/ca.pem' dbname=identity",
        );
        assert_eq!(rest, r"host=db user=app password='a \' b' dbname=identity");
        assert_eq!(ssl.mode.as_deref(), Some("verify-ca"));
        assert_eq!(ssl.root_cert.as_deref(), Some("/my certs/ca.pem"));
    }

    #[test]
    fn bad_modes_and_client_certificates_are_named() {
        let e = Target::parse("postgres://db/x?sslmode=verify_full").unwrap_err();
        assert!(e.0.contains("sslmode \"verify_full\""), "{e}");
        let e = Target::parse("postgres://db/x?sslcert=/c.pem").unwrap_err();
        assert!(e.0.starts_with("sslcert"), "{e}");
        let e =
            Target::parse("postgres://db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .unwrap_err();
        assert!(e.0.starts_with("sslrootcert /nonexistent/ca.pem"), "{e}");
        let e = Target::parse("postgres://u:secret@db/x?nonsense=1").unwrap_err();
        assert!(!e.0.contains("secret"), "{e}");
    }

    #[test]
    fn unix_sockets_never_speak_tls() {
        let t =
            Target::parse("postgres://postgres@/identity?host=/srv/run&sslmode=require").unwrap();
        assert!(t.tls.is_none());
        let t = Target::parse("postgres://db/identity").unwrap();
        assert_eq!(t.ssl_mode(), SslMode::Prefer);
        assert!(t.tls.is_some());
        let t = Target::parse("postgres://db/identity?sslmode=disable").unwrap();
        assert!(t.tls.is_none());
    }
}
