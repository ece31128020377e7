//! Prometheus metrics, served as text on `GET /metrics`: calls by service,
//! method and status code; call latency; open streams; the database pool;
//! the hashing queue; RESOURCE_EXHAUSTED refusals by cause; health; the
//! signing key's age and failed key reloads; and the process (CPU, memory,
//! file descriptors).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use tower::{Layer, Service};

use crate::db::Pool;
use crate::hashing::Hasher;
use crate::limits::{Cause, Refusals, StreamLimit};
use crate::telemetry::AccessLog;
use crate::token::TokenIssuer;

/// The service's metrics and what they are read from.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pool: IntGaugeVec,
    hash_queue: IntGauge,
    open_streams: IntGauge,
    log_dropped: prometheus::IntCounter,
    health: IntGaugeVec,
    key_reload_failures: IntCounter,
    key_age: Gauge,
    sources: Arc<Sources>,
    /// "/package.Service/Method" of every RPC served: only these become
    /// labels, so random paths cannot grow the registry.
    known: Arc<std::collections::HashSet<String>>,
}

struct Sources {
    pool: Pool,
    hasher: Hasher,
    streams: StreamLimit,
    tokens: TokenIssuer,
}

/// Where [`Metrics`] reads what it does not count itself, at each scrape.
pub struct Readings {
    /// The database pool (connections in use, idle, waited for).
    pub pool: Pool,
    /// The password hasher (its queue).
    pub hasher: Hasher,
    /// The stream limit (streams open).
    pub streams: StreamLimit,
    /// The keys in use (the signing key's age).
    pub tokens: TokenIssuer,
    /// Calls refused with RESOURCE_EXHAUSTED, by cause.
    pub refusals: Refusals,
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rpc_of_the_api_is_a_known_method() {
        let known = super::known_methods();
        assert!(known.contains("/identity.v1.UserService/CreateUser"));
        assert!(known.contains("/identity.v1.AuthService/VerifyToken"));
        assert!(known.contains("/grpc.health.v1.Health/Check"));
        assert!(known.contains("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!known.contains("/a.b/random"));
    }

    #[test]
    fn code_labels_are_the_documented_names() {
        use tonic::Code;
        let labels: Vec<&str> = (0..=16)
            .map(|c| super::code_label(Code::from_i32(c)))
            .collect();
        assert_eq!(
            labels,
            [
                "Ok",
                "Cancelled",
                "Unknown",
                "InvalidArgument",
                "DeadlineExceeded",
                "NotFound",
                "AlreadyExists",
                "PermissionDenied",
                "ResourceExhausted",
                "FailedPrecondition",
                "Aborted",
                "OutOfRange",
                "Unimplemented",
                "Internal",
                "Unavailable",
                "DataLoss",
                "Unauthenticated",
            ]
        );
        assert_eq!(super::code_name(b"8"), "ResourceExhausted");
        assert_eq!(super::code_name(b"99"), "Unknown");
        assert_eq!(super::code_name(b"x"), "Unknown");
    }
}

impl std::fmt::Debug for Readings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readings")
            .field("refusals", &self.refusals)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric; `readings` are read at each scrape.
    pub fn new(
        readings: Readings,
        feed: &crate::service::changes::FeedMetrics,
    ) -> Result<Self, prometheus::Error> {
        let Readings {
            pool: db_pool,
            hasher,
            streams,
            tokens,
            refusals,
        } = readings;
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "identity_grpc_requests_total",
                "Calls handled, by service, method and gRPC status code.",
            ),
            &["service", "method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "identity_grpc_request_duration_seconds",
                "Call latency, from request to last byte.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["service", "method"],
        )?;
        let pool = IntGaugeVec::new(
            Opts::new(
                "identity_db_pool_connections",
                "Database connections, by state (in_use, idle, waiting for one).",
            ),
            &["state"],
        )?;
        let log_dropped = prometheus::IntCounter::new(
            "identity_log_lines_dropped_total",
            "Log lines dropped because standard error's reader fell 128,000 lines behind.",
        )?;
        let hash_queue = IntGauge::new(
            "identity_hash_queue_depth",
            "Callers waiting for a password hashing slot.",
        )?;
        let open_streams = IntGauge::new(
            "identity_grpc_open_streams",
            "Server streams open now (health Watch, reflection, streaming RPCs), of MAX_STREAMS.",
        )?;
        let health = IntGaugeVec::new(
            Opts::new(
                "identity_health_serving",
                "1 while the health service reports SERVING, 0 otherwise; by service name \
                 (\"\" is the whole server).",
            ),
            &["service"],
        )?;
        let key_reload_failures = IntCounter::new(
            "identity_keys_reload_failures_total",
            "Reloads of KEYS_DIR (SIGHUP or KEYS_RELOAD_INTERVAL) that failed; the keys in use stayed.",
        )?;
        let key_age = Gauge::new(
            "identity_signing_key_age_seconds",
            "Age of the key that signs now, from the creation time in its file name.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(open_streams.clone()))?;
        registry.register(Box::new(health.clone()))?;
        registry.register(Box::new(key_reload_failures.clone()))?;
        registry.register(Box::new(key_age.clone()))?;
        registry.register(Box::new(RefusalCounts::new(refusals)?))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(pool.clone()))?;
        registry.register(Box::new(hash_queue.clone()))?;
        registry.register(Box::new(log_dropped.clone()))?;
        for collector in feed.collectors() {
            registry.register(collector)?;
        }
        registry.register(Box::new(ProcessMetrics::new()?))?;
        Ok(Self {
            registry,
            requests,
            latency,
            pool,
            hash_queue,
            open_streams,
            log_dropped,
            health,
            key_reload_failures,
            key_age,
            known: Arc::new(known_methods()),
            sources: Arc::new(Sources {
                pool: db_pool,
                hasher,
                streams,
                tokens,
            }),
        })
    }

    /// The gauge `identity_health_serving`, which the health service sets
    /// with each status it publishes.
    pub(crate) fn health(&self) -> IntGaugeVec {
        self.health.clone()
    }

    /// The counter `identity_keys_reload_failures_total`, which the key
    /// reloader counts its failures in.
    pub(crate) fn key_reload_failures(&self) -> IntCounter {
        self.key_reload_failures.clone()
    }

    /// Registers one more collector (the verification cache's).
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The text exposition of every metric, read now.
    pub fn render(&self) -> String {
        let dropped = crate::telemetry::dropped_log_lines();
        self.log_dropped
            .inc_by(dropped.saturating_sub(self.log_dropped.get()));
        let status = self.sources.pool.status();
        let size = i64::try_from(status.size).unwrap_or(i64::MAX);
        let idle = i64::try_from(status.available).unwrap_or(i64::MAX);
        self.pool.with_label_values(&["in_use"]).set(size - idle);
        self.pool.with_label_values(&["idle"]).set(idle);
        self.pool
            .with_label_values(&["waiting"])
            .set(i64::try_from(status.waiting).unwrap_or(i64::MAX));
        self.hash_queue
            .set(i64::try_from(self.sources.hasher.queue_depth()).unwrap_or(i64::MAX));
        self.open_streams
            .set(i64::try_from(self.sources.streams.open()).unwrap_or(i64::MAX));
        let created = self.sources.tokens.keys().signing().created;
        self.key_age
            .set((chrono::Utc::now() - created).num_milliseconds() as f64 / 1000.0);
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn record(&self, path: &str, code: &str, started: Instant) {
        // Plain HTTP (/metrics, /pub-key) is not counted; unknown gRPC paths
        // share one label pair.
        let (service, method) = if self.known.contains(path) {
            match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
                Some(pair) => pair,
                None => return,
            }
        } else if path.starts_with('/') && path[1..].contains('/') {
            ("unknown", "unknown")
        } else {
            return;
        };
        self.requests
            .with_label_values(&[service, method, code])
            .inc();
        self.latency
            .with_label_values(&[service, method])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// `identity_resource_exhausted_total`, read from [`Refusals`] at each
/// scrape: a collector of its own rather than a counter kept in step, so
/// that two scrapes at once cannot count a refusal twice. Every cause is
/// shown from the start, at 0, so that `rate()` sees the first refusal.
struct RefusalCounts {
    refusals: Refusals,
    desc: prometheus::core::Desc,
}

impl RefusalCounts {
    fn new(refusals: Refusals) -> Result<Self, prometheus::Error> {
        Ok(Self {
            refusals,
            desc: prometheus::core::Desc::new(
                "identity_resource_exhausted_total".to_owned(),
                "Calls refused with RESOURCE_EXHAUSTED, by cause (load_shed, hash_queue, \
                 login_throttle, reset_throttle, stream_limit, message_too_large)."
                    .to_owned(),
                vec!["cause".to_owned()],
                std::collections::HashMap::new(),
            )?,
        })
    }
}

impl prometheus::core::Collector for RefusalCounts {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::LabelPair;
        let samples = Cause::ALL.iter().map(|&cause| {
            let mut label = LabelPair::default();
            label.set_name("cause".to_owned());
            label.set_value(cause.as_str().to_owned());
            let value = self.refusals.count(cause) as f64;
            (vec![label], value)
        });
        vec![counter_family(&self.desc, samples)]
    }
}

/// A counter's family: one sample per (labels, value).
fn counter_family(
    desc: &prometheus::core::Desc,
    samples: impl Iterator<Item = (Vec<prometheus::proto::LabelPair>, f64)>,
) -> prometheus::proto::MetricFamily {
    use prometheus::proto::{Counter, Metric, MetricFamily, MetricType};
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(MetricType::COUNTER);
    family.set_metric(
        samples
            .map(|(labels, value)| {
                let mut counter = Counter::default();
                counter.set_value(value);
                let mut metric = Metric::default();
                metric.set_label(labels);
                metric.set_counter(counter);
                metric
            })
            .collect(),
    );
    family
}

/// The name of the process's CPU counter, as Prometheus's clients name it.
const CPU_SECONDS: &str = "process_cpu_seconds_total";

/// The `prometheus` crate's process collector (memory, file descriptors,
/// threads, start time) with its CPU counter replaced: the crate's is an
/// integer, the clock ticks divided by the tick rate in integer division,
/// so it moves in whole seconds and `rate()` over a minute of a quiet
/// replica reads 0 or 1/60. This one is a float, from getrusage(2) to the
/// microsecond, as Prometheus's own clients (Go's, Python's) report it.
struct ProcessMetrics {
    inner: prometheus::process_collector::ProcessCollector,
    cpu: prometheus::core::Desc,
}

impl ProcessMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
            cpu: prometheus::core::Desc::new(
                CPU_SECONDS.to_owned(),
                "Total user and system CPU time spent in seconds.".to_owned(),
                Vec::new(),
                std::collections::HashMap::new(),
            )?,
        })
    }
}

impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.inner
            .desc()
            .into_iter()
            .filter(|d| d.fq_name != CPU_SECONDS)
            .chain(std::iter::once(&self.cpu))
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families: Vec<prometheus::proto::MetricFamily> = self
            .inner
            .collect()
            .into_iter()
            .filter(|f| f.name() != CPU_SECONDS)
            .collect();
        if let Some(seconds) = cpu_seconds() {
            families.push(counter_family(
                &self.cpu,
                std::iter::once((Vec::new(), seconds)),
            ));
        }
        families
    }
}

/// The user and system CPU time of the whole process (every thread), in
/// seconds to the microsecond.
fn cpu_seconds() -> Option<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    use nix::sys::time::TimeVal;
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    // Summed in whole microseconds and divided once, so that the text shows
    // the microseconds (0.184341), not a float sum's tail (0.18434099999).
    let micros = |t: TimeVal| t.tv_sec() * 1_000_000 + t.tv_usec();
    Some((micros(usage.user_time()) + micros(usage.system_time())) as f64 / 1e6)
}

/// Every RPC of the descriptor sets the server registers.
fn known_methods() -> std::collections::HashSet<String> {
    crate::limits::rpc_methods()
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

/// The gRPC status code of a `grpc-status` value, by its label name.
fn code_name(value: &[u8]) -> String {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .map_or("Unknown", |c| code_label(tonic::Code::from_i32(c)))
        .to_owned()
}

/// The number of a status code by its label (`Ok` is 0); none for an HTTP
/// status.
pub fn code_number(label: &str) -> Option<i32> {
    (0..=16).find(|&n| code_label(tonic::Code::from_i32(n)) == label)
}

/// The `code` label of a status, as docs/operations.md documents it: the
/// code's name in CamelCase. Written out rather than taken from `Debug`,
/// which is no contract (dashboards and alerts match these strings).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Records every call's status and latency in [`Metrics`] and, when on,
/// writes its line of the access log ([`AccessLog`]), both when the call
/// ends: for a gRPC call, when its status is sent.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
    access: Option<AccessLog>,
}

impl MetricsLayer {
    /// Records into `metrics`, and logs each call to `access` when given.
    pub fn new(metrics: Metrics, access: Option<AccessLog>) -> Self {
        Self { metrics, access }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Measured {
            inner,
            metrics: self.metrics.clone(),
            access: self.access.clone(),
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: Metrics,
    access: Option<AccessLog>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Measured<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let entry = self.access.as_ref().map(|log| log.start(&mut request));
        let metrics = self.metrics.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            // The call's span (RequestContextLayer's), kept open until the
            // status is sent, so that its end is the call's.
            let span = tracing::Span::current();
            let response = call.await?;
            let done = move |code: &str| {
                metrics.record(&path, code, started);
                crate::telemetry::end_span(&span, code);
                if let Some(entry) = entry {
                    entry.finish(code, started);
                }
            };
            // A refusal before the handler (trailers-only) has its status in
            // the headers; a handler's answer has it in the trailers; plain
            // HTTP (/metrics, the keys) has none: its HTTP status is logged.
            if let Some(code) = response.headers().get("grpc-status") {
                done(&code_name(code.as_bytes()));
                return Ok(response);
            }
            let grpc = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if !grpc {
                done(response.status().as_str());
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(Observed {
                    inner: body,
                    done: Some(Box::new(move |code: String| done(&code))),
                })
            }))
        })
    }
}

type Done = Box<dyn FnOnce(String) + Send>;

/// A response body that reports the status in its trailers when it ends.
struct Observed {
    inner: tonic::body::Body,
    done: Option<Done>,
}

impl Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status"))
                    && let Some(done) = this.done.take()
                {
                    done(code_name(code.as_bytes()));
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done("Unknown".to_owned());
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    /// A body dropped before its status was sent: the client went away
    /// (reset the stream or closed the connection) mid-call.
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done("Cancelled".to_owned());
        }
    }
}
