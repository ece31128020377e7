//! Prometheus metrics, served as text on `GET /metrics`: calls by service,
//! method and status code; call latency; open streams; the database pool;
//! the hashing queue; and the process (CPU, memory, file descriptors).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tower::{Layer, Service};

use crate::db::Pool;
use crate::hashing::Hasher;
use crate::limits::StreamLimit;
use crate::telemetry::AccessLog;

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
    sources: Arc<Sources>,
    /// "/package.Service/Method" of every RPC served: only these become
    /// labels, so random paths cannot grow the registry.
    known: Arc<std::collections::HashSet<String>>,
}

struct Sources {
    pool: Pool,
    hasher: Hasher,
    streams: StreamLimit,
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

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric; `pool`, `hasher` and `streams` are read at
    /// each scrape.
    pub fn new(
        db_pool: Pool,
        hasher: Hasher,
        streams: StreamLimit,
        feed: &crate::service::changes::FeedMetrics,
    ) -> Result<Self, prometheus::Error> {
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
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(open_streams.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(pool.clone()))?;
        registry.register(Box::new(hash_queue.clone()))?;
        registry.register(Box::new(log_dropped.clone()))?;
        for collector in feed.collectors() {
            registry.register(collector)?;
        }
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            requests,
            latency,
            pool,
            hash_queue,
            open_streams,
            log_dropped,
            known: Arc::new(known_methods()),
            sources: Arc::new(Sources {
                pool: db_pool,
                hasher,
                streams,
            }),
        })
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
