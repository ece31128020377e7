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

/// Installs the global subscriber, writing to stderr from the calling
/// thread. Later calls do nothing, so that tests may call it once per test.
pub fn init(format: LogFormat) {
    install(format, None, std::io::stderr);
}

/// Log lines dropped because the writer's queue was full.
static DROPPED: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// How many log lines were dropped so far because stderr's reader fell
/// 128,000 lines behind (`identity_log_lines_dropped_total`).
pub fn dropped_log_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// The service's subscriber: as [`init`], exporting spans through
/// `traces` when given, and writing lines from a thread of its own, so
/// that a slow reader of stderr (a full pipe, a stuck log collector) never
/// blocks a call: lines queue, up to 128,000, and beyond that are dropped
/// and counted (`identity_log_lines_dropped_total`) rather than stalling
/// the service. Call [`finish_logs`] before exit: it writes what is
/// queued.
pub fn init_with(format: LogFormat, traces: Option<&Traces>) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("identity-log")
        // The thread drains what is queued into this buffer and flushes it
        // once the queue is empty: one write for a burst of lines.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    let _ = ACCESS_SINK.set(AccessSink {
        writer: writer.clone(),
        json: format == LogFormat::Json,
    });
    install(format, traces, writer);
    if let Ok(mut held) = GUARD.lock() {
        *held = Some(guard);
    }
}

/// The log writer's thread, held until [`finish_logs`].
static GUARD: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Writes every queued log line and stops the writer: the last thing
/// before a command's final line on standard error, so that this line is
/// the last. Lines logged after it are lost.
pub fn finish_logs() {
    let guard = GUARD.lock().ok().and_then(|mut held| held.take());
    drop(guard);
}

fn install<W>(format: LogFormat, traces: Option<&Traces>, writer: W)
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Without a Sentry client bound, this layer sends nothing.
    let sentry = sentry::integrations::tracing::ErrorLayer::new().with_filter(LevelFilter::ERROR);
    if traces.is_some() {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let otel = traces.map(|t| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(t.provider.tracer("identity"))
    });
    let registry = tracing_subscriber::registry()
        .with(sentry)
        .with(filter)
        .with(caps())
        .with(otel);
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(writer))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .event_format(ListsAsArrays(fmt::format().json()))
                    .with_ansi(false)
                    .with_writer(writer),
            )
            .try_init(),
    };
}

/// A list logged as one field, `kids = %List(&kids)`: `["a","b"]` in text
/// logs, and a JSON array in JSON logs (for a field named in
/// [`LIST_FIELDS`]), not a string holding one.
#[derive(Debug)]
pub struct List<'a, T>(pub &'a [T]);

impl<T: AsRef<str>> std::fmt::Display for List<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<&str> = self.0.iter().map(AsRef::as_ref).collect();
        let text = serde_json::to_string(&items).map_err(|_| std::fmt::Error)?;
        f.write_str(&text)
    }
}

/// The fields logged with [`List`]: in JSON logs their value is the array
/// itself. tracing records a field as a string or a number, never a list,
/// so the JSON line is mended after tracing-subscriber wrote it, and only
/// for events that have one of these fields.
pub const LIST_FIELDS: &[&str] = &["kids", "migrations", "amr"];

/// tracing-subscriber's JSON event format, with the fields of
/// [`LIST_FIELDS`] written as JSON arrays.
struct ListsAsArrays<F>(F);

impl<S, N, F> fmt::FormatEvent<S, N> for ListsAsArrays<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> fmt::FormatFields<'a> + 'static,
    F: fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &fmt::FmtContext<'_, S, N>,
        mut writer: fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let lists = event
            .metadata()
            .fields()
            .iter()
            .any(|f| LIST_FIELDS.contains(&f.name()));
        if !lists {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0
            .format_event(ctx, fmt::format::Writer::new(&mut line), event)?;
        for name in LIST_FIELDS {
            line = unquote_list(line, name);
        }
        writer.write_str(&line)
    }
}

/// `line` with the value of `"name":"[...]"` (a JSON string holding a JSON
/// array) replaced by the array; unchanged when there is no such field.
fn unquote_list(line: String, name: &str) -> String {
    let key = format!("\"{name}\":");
    let Some(at) = line.find(&key) else {
        return line;
    };
    let start = at + key.len();
    let rest = &line[start..];
    let mut strings = serde_json::Deserializer::from_str(rest).into_iter::<String>();
    let Some(Ok(text)) = strings.next() else {
        return line;
    };
    let end = start + strings.byte_offset();
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(array @ serde_json::Value::Array(_)) => {
            format!("{}{array}{}", &line[..start], &line[end..])
        }
        _ => line,
    }
}

/// Spans exported over OTLP/gRPC (`OTEL_EXPORTER_OTLP_ENDPOINT`), in
/// batches from a thread of the SDK's. The SDK reads the other standard
/// variables itself: `OTEL_SERVICE_NAME` (default here: `identity`),
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (default: parent-based,
/// always on) and `OTEL_BSP_*` (batching).
#[derive(Debug)]
pub struct Traces {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Traces {
    /// Starts the exporter towards `endpoint` (`http://collector:4317`).
    /// Inside the runtime: the exporter's channel lives on it.
    pub fn start(endpoint: &str) -> Result<Self, String> {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        );
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("identity");
        }
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Self { provider })
    }

    /// Sends what is queued and stops the exporter (at most the SDK's
    /// export timeout), off the async workers.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "spans could not all be exported at exit");
            }
        })
        .await;
    }
}

/// Whether spans are exported ([`init_with`] with [`Traces`]).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reads W3C `traceparent` (and `tracestate`) from a request's headers.
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context, from its `traceparent`; empty without one
/// (or with a malformed one).
fn remote_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    use opentelemetry::propagation::TextMapPropagator;
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Headers(headers))
}

/// What the span of a call records when it ends: its status, as
/// OpenTelemetry's gRPC conventions say (`rpc.grpc.status_code`; an error
/// status for the codes that mean the server failed).
pub fn end_span(span: &tracing::Span, code: &str) {
    use opentelemetry::trace::Status;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    // Nothing to record where no span is exported (most calls, on the hot
    // path of VerifyToken).
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let Some(number) = crate::metrics::code_number(code) else {
        return;
    };
    span.set_attribute("rpc.grpc.status_code", i64::from(number));
    use tonic::Code::*;
    if matches!(
        tonic::Code::from_i32(number),
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    ) {
        span.set_status(Status::error(code.to_owned()));
    }
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

/// A call's W3C trace id, in its request's extensions when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceId(pub String);

/// A call's request id, in its request's extensions for the layers and
/// handlers inside (the change feed records it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Gives every call a request id (echoed in `x-request-id`), a tracing span
/// with the RPC, that id and the trace id, and a Sentry hub of its own
/// tagged with both, so that whatever the call reports says which call it
/// was. The span continues the caller's W3C `traceparent`; when spans are
/// exported ([`Traces`]) it is a server span named after the RPC.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestContextLayer {
    traced: bool,
}

impl RequestContextLayer {
    /// `traced`: spans are exported, so they carry OpenTelemetry's names.
    pub fn new(traced: bool) -> Self {
        Self { traced }
    }
}

impl<S> tower::Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestContext {
            inner,
            traced: self.traced,
        }
    }
}

/// The service of [`RequestContextLayer`].
#[derive(Debug, Clone)]
pub struct RequestContext<S> {
    inner: S,
    traced: bool,
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
        let span = if self.traced {
            let name = rpc.trim_start_matches('/');
            tracing::info_span!("rpc", rpc = %rpc, request_id = %id, trace_id = tracing::field::Empty,
                otel.name = %name, otel.kind = "server")
        } else {
            tracing::info_span!("rpc", rpc = %rpc, request_id = %id, trace_id = tracing::field::Empty)
        };
        {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let remote = remote_context(request.headers());
            let remote_trace = remote.span().span_context().trace_id();
            // Exported: the span continues the caller's and has a trace id
            // of its own when the caller sent none. Not exported: the
            // caller's trace id, if any, is all there is to log.
            let trace = if self.traced {
                let _ = span.set_parent(remote);
                span.set_attribute("rpc.system", "grpc");
                if let Some((service, method)) =
                    rpc.strip_prefix('/').and_then(|p| p.split_once('/'))
                {
                    span.set_attribute("rpc.service", service.to_owned());
                    span.set_attribute("rpc.method", method.to_owned());
                }
                span.context().span().span_context().trace_id()
            } else {
                remote_trace
            };
            if trace != opentelemetry::TraceId::INVALID {
                span.record("trace_id", tracing::field::display(trace));
                request.extensions_mut().insert(TraceId(trace.to_string()));
            }
        }
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

/// The access log (`ACCESS_LOG`, on by default): one line per call at info,
/// target `identity::access`, written when the call ends: the RPC (or HTTP
/// path), its status code, its duration, the request id, the caller's user
/// id when a credential proved it, the peer's address, and the
/// `x-forwarded-for` header only when the peer is one of `TRUSTED_PROXIES`
/// (anyone else could write anything there). Never a credential: no other
/// header is read.
#[derive(Debug, Clone)]
pub struct AccessLog {
    trusted: Arc<[ipnet::IpNet]>,
}

impl AccessLog {
    /// An access log that believes `x-forwarded-for` from `trusted` peers.
    pub fn new(trusted: &[ipnet::IpNet]) -> Self {
        Self {
            trusted: trusted.into(),
        }
    }

    /// What the line of `request` will say, read as the call starts; the
    /// caller's slot goes into the request for the auth layer to fill.
    pub fn start<B>(&self, request: &mut http::Request<B>) -> AccessEntry {
        let peer = peer_addr(request.extensions());
        let forwarded_for = peer
            .filter(|p| self.trusted.iter().any(|net| net.contains(&p.ip())))
            .and_then(|_| request.headers().get("x-forwarded-for"))
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                v.len() <= 512
                    && v.bytes()
                        .all(|b| b.is_ascii_hexdigit() || b".:, []".contains(&b))
            })
            .map(str::to_owned);
        let caller = CallerSlot::default();
        request.extensions_mut().insert(caller.clone());
        AccessEntry {
            path: request.uri().path().to_owned(),
            request_id: request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.clone())
                .unwrap_or_default(),
            peer,
            forwarded_for,
            trace_id: request.extensions().get::<TraceId>().map(|t| t.0.clone()),
            caller,
        }
    }
}

/// The client's socket address, as tonic's server records it (plaintext or
/// TLS).
fn peer_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// Where the auth layer writes the id of the user a call's credential
/// proved, for the access log line written when the call ends.
#[derive(Debug, Clone, Default)]
pub struct CallerSlot(Arc<std::sync::OnceLock<uuid::Uuid>>);

impl CallerSlot {
    /// Records the caller (the first record stands).
    pub fn set(&self, user: uuid::Uuid) {
        let _ = self.0.set(user);
    }
}

/// One call's access log line, written by [`AccessEntry::finish`].
#[derive(Debug)]
pub struct AccessEntry {
    path: String,
    request_id: String,
    peer: Option<std::net::SocketAddr>,
    forwarded_for: Option<String>,
    trace_id: Option<String>,
    caller: CallerSlot,
}

impl AccessEntry {
    /// Writes the line: `code` is the gRPC status's name (`Ok`,
    /// `Unauthenticated`, ...) or, for plain HTTP, the HTTP status.
    pub fn finish(self, code: &str, started: std::time::Instant) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // RUST_LOG decides, as for any line (`identity::access=off`).
        if !tracing::enabled!(target: "identity::access", tracing::Level::INFO) {
            return;
        }
        if let Some(sink) = ACCESS_SINK.get() {
            sink.write(&self, code, micros);
            return;
        }
        // Without the service's writer (a library user's subscriber): an
        // event of its own, outside the call's span, its fields saying all.
        tracing::info!(
            target: "identity::access",
            parent: None,
            rpc = %self.path,
            code,
            duration_ms = micros as f64 / 1000.0,
            request_id = %self.request_id,
            caller = self.caller.0.get().map(display),
            peer = self.peer.map(display),
            forwarded_for = self.forwarded_for.as_deref(),
            trace_id = self.trace_id.as_deref(),
            "call"
        );
    }
}

/// Where the service writes access lines: the log writer itself, without
/// tracing's formatter. One line a call is the hottest log line there is;
/// formatting it from a fixed struct costs a fraction of formatting an
/// event's fields (BENCHMARKS.md, "The access log"). The line has the shape
/// of every other line of `LOG_FORMAT` (JSON: `timestamp`, `level`,
/// `fields`, `target`), without colours.
struct AccessSink {
    writer: tracing_appender::non_blocking::NonBlocking,
    json: bool,
}

static ACCESS_SINK: std::sync::OnceLock<AccessSink> = std::sync::OnceLock::new();

#[derive(serde::Serialize)]
struct AccessJson<'a> {
    timestamp: &'a str,
    level: &'static str,
    fields: AccessFields<'a>,
    target: &'static str,
}

#[derive(serde::Serialize)]
struct AccessFields<'a> {
    message: &'static str,
    rpc: &'a str,
    code: &'a str,
    duration_ms: f64,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarded_for: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
}

impl AccessSink {
    fn write(&self, entry: &AccessEntry, code: &str, micros: u64) {
        use std::io::Write;
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let fields = AccessFields {
            message: "call",
            rpc: &entry.path,
            code,
            duration_ms: micros as f64 / 1000.0,
            request_id: &entry.request_id,
            caller: entry.caller.0.get().map(ToString::to_string),
            peer: entry.peer.map(|p| p.to_string()),
            forwarded_for: entry.forwarded_for.as_deref(),
            trace_id: entry.trace_id.as_deref(),
        };
        let mut line = Vec::with_capacity(320);
        if self.json {
            let json = AccessJson {
                timestamp: &timestamp,
                level: "INFO",
                fields,
                target: "identity::access",
            };
            if serde_json::to_writer(&mut line, &json).is_err() {
                return;
            }
        } else {
            let _ = write!(
                line,
                "{timestamp}  INFO identity::access: call rpc={} code={} duration_ms={} request_id={}",
                fields.rpc, fields.code, fields.duration_ms, fields.request_id
            );
            for (name, value) in [
                ("caller", fields.caller.as_deref()),
                ("peer", fields.peer.as_deref()),
                ("forwarded_for", fields.forwarded_for),
                ("trace_id", fields.trace_id),
            ] {
                if let Some(value) = value {
                    let _ = write!(line, " {name}={value}");
                }
            }
        }
        line.push(b'\n');
        // One message on the writer's queue: the line stays whole.
        let _ = self.writer.clone().write_all(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_field_becomes_an_array_and_the_rest_of_the_line_stays() {
        let kids = List(&["a\"b", "c"]).to_string();
        assert_eq!(kids, r#"["a\"b","c"]"#);
        let quoted = serde_json::to_string(&kids).unwrap();
        let line = format!(r#"{{"fields":{{"kids":{quoted},"n":1}},"target":"x"}}"#);
        let mended = unquote_list(line, "kids");
        let v: serde_json::Value = serde_json::from_str(&mended).unwrap();
        assert_eq!(v["fields"]["kids"], serde_json::json!(["a\"b", "c"]));
        assert_eq!(v["fields"]["n"], 1);
        assert_eq!(v["target"], "x");
        // Not a list, or not there: untouched.
        let plain = r#"{"fields":{"kids":"abc"}}"#.to_owned();
        assert_eq!(unquote_list(plain.clone(), "kids"), plain);
        assert_eq!(unquote_list(plain.clone(), "migrations"), plain);
    }

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
    fn forwarded_for_is_read_only_from_trusted_peers_and_only_as_addresses() {
        use tonic::transport::server::TcpConnectInfo;
        let log = AccessLog::new(&["10.0.0.0/8".parse().unwrap()]);
        let request = |peer: &str, xff: &str| {
            let mut r = http::Request::new(());
            r.headers_mut()
                .insert("x-forwarded-for", xff.parse().unwrap());
            r.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer.parse().unwrap()),
            });
            r
        };
        let entry = log.start(&mut request("10.1.2.3:5000", "203.0.113.9, 10.0.0.7"));
        assert_eq!(
            entry.forwarded_for.as_deref(),
            Some("203.0.113.9, 10.0.0.7")
        );
        assert_eq!(entry.peer, Some("10.1.2.3:5000".parse().unwrap()));
        let entry = log.start(&mut request("192.0.2.1:5000", "203.0.113.9"));
        assert_eq!(entry.forwarded_for, None, "an untrusted peer's header");
        let entry = log.start(&mut request("10.1.2.3:5000", "x\" injected=1"));
        assert_eq!(entry.forwarded_for, None, "not an address list");
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
