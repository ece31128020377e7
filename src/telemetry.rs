//! Logs and error reporting: a tracing subscriber writing text or JSON lines
//! to standard error, filtered by `RUST_LOG` (default `info`); and, when
//! `SENTRY_DSN` is set, Sentry: error-level events and panics become Sentry
//! events tagged with the RPC, the request id and the release.
//!
//! Nothing logged anywhere carries a password, a hash or a token: handlers
//! are instrumented with `skip_all`/`skip`, [`crate::domain::Password`]'s
//! `Debug` hides its value, library log lines that print what they carry
//! are held back whatever `RUST_LOG` says ([`CAPPED`]), and Sentry events
//! lose any Authorization or Cookie header before they leave
//! (`before_send`).
//!
//! [`CAPPED`]: crate::telemetry::CAPPED

use std::sync::Arc;

use tracing_subscriber::{
    EnvFilter,
    filter::{LevelFilter, Targets},
    fmt,
    prelude::*,
};

/// Library targets and the most they may log, whatever `RUST_LOG` asks:
/// a second filter beside `RUST_LOG`'s, which an event must pass too, so
/// that no directive (`RUST_LOG=trace`, `tokio_postgres=trace`) widens it.
///
/// - `tokio_postgres` (through the `log` bridge) prints at debug every
///   statement's bound parameters, as byte lists: password hashes, account
///   token hashes, emails and canonical logins. It logs nothing above debug.
///
/// Read at trace, and left open: `h2` prints frames without their header
/// fields or data (its `Debug` leaves them out on purpose) and the value of
/// a `te` header that is not "trailers"; `hyper` prints sizes and header
/// names, never values; `tonic` prints errors and connection events;
/// `diesel`, `diesel_async` and `deadpool` do not log. The tests `logs::`
/// run the service at trace, debug and the default level and scan every
/// line for every secret in every encoding, so that a library that starts
/// printing one is caught.
pub const CAPPED: &[(&str, LevelFilter)] = &[("tokio_postgres", LevelFilter::INFO)];

/// The filter of [`CAPPED`]: everything else passes.
pub fn caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(CAPPED.iter().copied())
}

use crate::config::LogFormat;

/// Installs the global subscriber. Later calls do nothing, so that tests may
/// call it once per test.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Without a Sentry client bound, this layer sends nothing.
    let sentry = sentry::integrations::tracing::ErrorLayer::new().with_filter(LevelFilter::ERROR);
    let registry = tracing_subscriber::registry()
        .with(sentry)
        .with(filter)
        .with(caps());
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_ansi(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// Whether text log lines are coloured: only when standard error is a
/// terminal (a file, a pipe or a log collector would keep the escape
/// sequences as text), and never when `NO_COLOR` is set to anything but the
/// empty string (<https://no-color.org>). tracing-subscriber on its own
/// honours `NO_COLOR` but colours a pipe.
pub fn colours(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Starts the Sentry client when `dsn` is set; keep the guard for the life
/// of the process (dropping it flushes what is queued).
pub fn init_sentry(dsn: Option<&str>) -> Option<sentry::ClientInitGuard> {
    let dsn = dsn?;
    let options = sentry::ClientOptions::new()
        .dsn(dsn)
        .release(sentry::release_name!().unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()))
        .send_default_pii(false)
        .before_send(|event| Some(scrub(event)));
    Some(sentry::init(options))
}

/// Removes credentials an event might carry in a request's headers.
pub fn scrub(mut event: sentry::protocol::Event<'static>) -> sentry::protocol::Event<'static> {
    if let Some(request) = event.request.as_mut() {
        request.headers.retain(|name, _| {
            !matches!(
                name.to_ascii_lowercase().as_str(),
                "authorization" | "cookie" | "set-cookie"
            )
        });
        request.cookies = None;
        request.data = None;
    }
    event
}

/// The request id of a call: the client's `x-request-id` when it is a sane
/// token, else a new UUIDv7.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// A call's request id, in its request's extensions for the layers and
/// handlers inside (the change feed records it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Gives every call a request id (echoed in `x-request-id`), a tracing span
/// with the RPC and that id, and a Sentry hub of its own tagged with both,
/// so that whatever the call reports says which call it was.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestContextLayer;

impl<S> tower::Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestContext { inner }
    }
}

/// The service of [`RequestContextLayer`].
#[derive(Debug, Clone)]
pub struct RequestContext<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RequestContext<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        use sentry::SentryFutureExt;
        use tracing::Instrument;
        let id = request_id(request.headers());
        request.extensions_mut().insert(RequestId(id.clone()));
        let rpc = request.uri().path().to_owned();
        let span = tracing::info_span!("rpc", rpc = %rpc, request_id = %id);
        let hub = Arc::new(sentry::Hub::new_from_top(sentry::Hub::main()));
        hub.configure_scope(|scope| {
            scope.set_tag("rpc", &rpc);
            scope.set_tag("request_id", &id);
        });
        let call = self.inner.call(request);
        Box::pin(
            async move {
                tracing::debug!("call started");
                let mut response = call.await?;
                if let Ok(value) = http::HeaderValue::from_str(&id) {
                    response.headers_mut().insert("x-request-id", value);
                }
                Ok(response)
            }
            .instrument(span)
            .bind_hub(hub),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentry_events_lose_credentials() {
        let mut event = sentry::protocol::Event::default();
        let mut request = sentry::protocol::Request::default();
        request
            .headers
            .insert("Authorization".into(), "Bearer secret".into());
        request.headers.insert("x-request-id".into(), "abc".into());
        event.request = Some(request);
        let event = scrub(event);
        let headers = &event.request.unwrap().headers;
        assert!(!headers.contains_key("Authorization"));
        assert!(headers.contains_key("x-request-id"));
    }

    #[test]
    fn statement_parameters_stay_out_at_every_level() {
        use tracing::Level;
        let caps = caps();
        for target in [
            "tokio_postgres::query",
            "tokio_postgres::prepare",
            "tokio_postgres",
        ] {
            for level in [Level::TRACE, Level::DEBUG] {
                assert!(!caps.would_enable(target, &level), "{target} at {level}");
            }
            assert!(caps.would_enable(target, &Level::INFO));
        }
        for target in [
            "identity::service::auth",
            "h2::codec",
            "hyper::proto",
            "tonic",
        ] {
            assert!(caps.would_enable(target, &Level::TRACE), "{target}");
        }
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colours(true, None));
        assert!(
            colours(true, Some(OsStr::new(""))),
            "empty NO_COLOR is unset"
        );
        assert!(!colours(true, Some(OsStr::new("1"))));
        assert!(!colours(true, Some(OsStr::new("0"))), "any value counts");
        assert!(!colours(false, None));
        assert!(!colours(false, Some(OsStr::new(""))));
    }

    #[test]
    fn request_ids_come_from_the_client_when_sane() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", "req-123".parse().unwrap());
        assert_eq!(request_id(&h), "req-123");
        h.insert("x-request-id", "bad id with spaces".parse().unwrap());
        assert_ne!(request_id(&h), "bad id with spaces");
    }
}
