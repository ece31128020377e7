//! Limits around every call, as tower layers: a deadline (the server's
//! maximum, or the client's shorter `grpc-timeout`), a cap on the request
//! body, and (in `app/mod.rs`) a global concurrency limit that sheds load
//! instead of queueing it.
//!
//! Streams (health Watch, reflection, any RPC whose descriptor says it
//! streams) are bounded apart, by [`StreamLimit`]: the unary limits above
//! guard only the future of a call's response headers, which a stream
//! returns at once and then lives on in its body. A stream holds a permit of
//! `MAX_STREAMS` until its body ends, is exempt from the deadline and from
//! the unary concurrency limit, and ends with OK when shutdown begins.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

/// Bounds each call by `max`, or by the client's `grpc-timeout` when that is
/// shorter. On expiry the handler's future is dropped (its work cancelled)
/// and the client gets DEADLINE_EXCEEDED.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    max: Duration,
}

impl DeadlineLayer {
    /// A deadline of at most `max`.
    pub fn new(max: Duration) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            max: self.max,
        }
    }
}

/// The service of [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (gRPC over
/// HTTP/2: H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Deadline<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // A stream lasts as long as its client wants (MAX_STREAMS bounds how
        // many); its headers come at once anyway.
        if request.extensions().get::<StreamCall>().is_some() {
            return Box::pin(self.inner.call(request));
        }
        let client = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        // A hair before the client's own deadline, so that the client hears
        // DEADLINE_EXCEEDED from us rather than cancelling on its side.
        let limit = client.map_or(self.max, |c| {
            c.saturating_sub(Duration::from_millis(2)).min(self.max)
        });
        let call = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::info!(?limit, "deadline exceeded: call cancelled");
                    Ok(tonic::Status::deadline_exceeded("deadline exceeded").into_http())
                }
            }
        })
    }
}

/// Refuses a request body larger than `max` bytes with RESOURCE_EXHAUSTED,
/// before it is buffered.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max: usize,
}

impl BodyLimitLayer {
    /// A limit of `max` bytes per request body (for unary gRPC calls: one
    /// message and its 5-byte frame header).
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// The service of [`BodyLimitLayer`].
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: usize,
}

impl<S> Service<Request<tonic::body::Body>> for BodyLimit<S>
where
    S: Service<Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        // Reflection and health Watch are streams of small messages: the cap
        // is for this API's unary calls.
        let path = request.uri().path();
        if path.starts_with("/grpc.reflection.") || path.starts_with("/grpc.health.") {
            return self.inner.call(request);
        }
        let max = self.max;
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(Limited {
                inner: body,
                left: max,
                max,
            })
        }))
    }
}

/// A body that fails with RESOURCE_EXHAUSTED past its limit. tonic finds
/// the `Status` in the error and answers with it.
struct Limited {
    inner: tonic::body::Body,
    left: usize,
    max: usize,
}

impl Body for Limited {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if data.len() > this.left {
                        let max = this.max;
                        return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                            "request message too large: the limit is {} bytes",
                            max.saturating_sub(5)
                        )))));
                    }
                    this.left -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// At most `max` calls at once across all connections; more are refused at
/// once with RESOURCE_EXHAUSTED and a `google.rpc.RetryInfo` (load shedding:
/// a queue would only add latency to an overload). Health checks and
/// `/metrics` bypass the limit, so that probes keep answering at peak load.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

impl ShedLayer {
    /// A limit of `max` calls in flight.
    pub fn new(max: usize) -> Self {
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
        }
    }
}

impl<S: Clone> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let limited = tower::ServiceBuilder::new()
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
                self.permits.clone(),
            ))
            .service(inner.clone());
        Shed {
            direct: inner,
            limited,
        }
    }
}

/// The service of [`ShedLayer`].
#[derive(Debug, Clone)]
pub struct Shed<S> {
    direct: S,
    limited: tower::load_shed::LoadShed<tower::limit::ConcurrencyLimit<S>>,
}

fn bypasses_the_limit(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path == "/metrics"
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Shed<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        use tower::ServiceExt;
        if bypasses_the_limit(request.uri().path())
            || request.extensions().get::<StreamCall>().is_some()
        {
            let call = self.direct.call(request);
            return Box::pin(async move { call.await.map_err(Into::into) });
        }
        let limited = self.limited.clone();
        Box::pin(async move {
            match limited.oneshot(request).await {
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                    use tonic_types::{ErrorDetails, StatusExt};
                    tracing::debug!("at capacity: call shed");
                    Ok(tonic::Status::with_error_details(
                        tonic::Code::ResourceExhausted,
                        "the service is at capacity; retry shortly",
                        ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
                    )
                    .into_http())
                }
                other => other,
            }
        })
    }
}

/// Every RPC the server registers, as its path ("/package.Service/Method")
/// and whether it streams (from the server, the client or both): read from
/// the descriptor sets of identity, health and reflection (v1 and v1alpha),
/// so that a streaming RPC added to `proto/` is known as one at once.
pub fn rpc_methods() -> Vec<(String, bool)> {
    use prost::Message;
    let mut methods = Vec::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(set)
            .expect("descriptor sets built into the binary decode");
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    let streams = method.server_streaming() || method.client_streaming();
                    methods.push((path, streams));
                }
            }
        }
    }
    methods
}

/// Marks a request as a stream (put in its extensions by [`Streams`]), so
/// that the deadline and the unary concurrency limit let it through.
#[derive(Debug, Clone, Copy)]
pub struct StreamCall;

/// At most `MAX_STREAMS` streams open at once, across all connections; one
/// more is refused at once with RESOURCE_EXHAUSTED. [`StreamLimit::close`]
/// ends every open stream with OK (and refuses new ones with UNAVAILABLE),
/// so that a graceful shutdown does not wait out its grace period for
/// watchers that would never leave.
#[derive(Debug, Clone)]
pub struct StreamLimit {
    inner: std::sync::Arc<StreamInner>,
}

#[derive(Debug)]
struct StreamInner {
    max: usize,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    closing: tokio_util::sync::CancellationToken,
    streaming: std::collections::HashSet<String>,
}

impl StreamLimit {
    /// A limit of `max` open streams.
    pub fn new(max: usize) -> Self {
        let streaming = rpc_methods()
            .into_iter()
            .filter_map(|(path, streams)| streams.then_some(path))
            .collect();
        Self {
            inner: std::sync::Arc::new(StreamInner {
                max,
                permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
                closing: tokio_util::sync::CancellationToken::new(),
                streaming,
            }),
        }
    }

    /// Whether the RPC at `path` streams.
    pub fn is_stream(&self, path: &str) -> bool {
        self.inner.streaming.contains(path)
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.inner
            .max
            .saturating_sub(self.inner.permits.available_permits())
    }

    /// Ends every open stream with OK (after what it has ready to send) and
    /// refuses new ones: shutdown has begun.
    pub fn close(&self) {
        self.inner.closing.cancel();
    }

    /// The layer that applies this limit.
    pub fn layer(&self) -> StreamLayer {
        StreamLayer {
            limit: self.clone(),
        }
    }
}

/// The layer of [`StreamLimit`].
#[derive(Debug, Clone)]
pub struct StreamLayer {
    limit: StreamLimit,
}

impl<S> Layer<S> for StreamLayer {
    type Service = Streams<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Streams {
            inner,
            limit: self.limit.clone(),
        }
    }
}

/// The service of [`StreamLayer`].
#[derive(Debug, Clone)]
pub struct Streams<S> {
    inner: S,
    limit: StreamLimit,
}

impl<S> Service<Request<tonic::body::Body>> for Streams<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path();
        if !self.limit.is_stream(path) {
            return Box::pin(self.inner.call(request));
        }
        let inner = &self.limit.inner;
        if inner.closing.is_cancelled() {
            let refused = tonic::Status::unavailable("the service is shutting down");
            return Box::pin(async move { Ok(refused.into_http()) });
        }
        let Ok(permit) = inner.permits.clone().try_acquire_owned() else {
            tracing::debug!(max = inner.max, "MAX_STREAMS reached: stream refused");
            let refused = tonic::Status::resource_exhausted(
                "the service has as many streams open as it allows; retry later",
            );
            return Box::pin(async move { Ok(refused.into_http()) });
        };
        let rpc = path.to_owned();
        // Cancelled at shutdown, and when this stream's answer ends.
        let ended = inner.closing.child_token();
        let mut request = request.map(|body| {
            tonic::body::Body::new(Requests {
                inner: body,
                ended: Box::pin(ended.clone().cancelled_owned()),
            })
        });
        request.extensions_mut().insert(StreamCall);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Bounded {
                    inner: body,
                    permit: Some(permit),
                    rpc,
                    closing: Box::pin(ended.clone().cancelled_owned()),
                    ended,
                    drain: None,
                })
            }))
        })
    }
}

/// Frames a stream may still send once shutdown has begun, if they are
/// ready, before it is ended: what it had queued (a health watcher's
/// NOT_SERVING) goes out, a stream that never pauses cannot hold shutdown.
const DRAIN_FRAMES: u8 = 16;

/// A stream's response body: holds its permit until it ends, and ends it
/// with OK trailers when shutdown begins.
struct Bounded {
    inner: tonic::body::Body,
    /// Given back when the stream ends (or its body is dropped: the client
    /// went away).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    rpc: String,
    /// Shutdown has begun.
    closing: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Cancelled when this answer ends, to end the requests too.
    ended: tokio_util::sync::CancellationToken,
    /// Frames left before the end, once shutdown has begun.
    drain: Option<u8>,
}

impl Bounded {
    /// Gives the permit back, before the stream's last frame is sent, so
    /// that a client that has seen its stream end finds the permit free;
    /// and ends the stream's requests.
    fn finish(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        drop(permit);
        self.ended.cancel();
        tracing::debug!(rpc = %self.rpc, "stream ended");
    }
}

/// A stream's request body, which ends when its answer has ended (or
/// shutdown begins), even if the client's side stays open. A handler that
/// reads requests in a task of its own (reflection does) then lets go of
/// them, and HTTP/2 closes the stream (RST_STREAM NO_ERROR); else the
/// half-open stream would hold a graceful shutdown for its whole grace
/// period.
struct Requests {
    inner: tonic::body::Body,
    ended: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Body for Requests {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for Bounded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.permit.is_none() {
            return Poll::Ready(None);
        }
        if this.drain.is_none() && this.closing.as_mut().poll(cx).is_ready() {
            this.drain = Some(DRAIN_FRAMES);
        }
        if this.drain != Some(0) {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if frame.is_trailers() {
                        this.finish();
                    } else if let Some(left) = this.drain.as_mut() {
                        *left -= 1;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(status))) => {
                    this.finish();
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Poll::Pending if this.drain.is_none() => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        // Shutdown: the stream ends cleanly, as if its server side had
        // finished.
        this.finish();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.permit.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_known_from_the_descriptors() {
        let limit = StreamLimit::new(1);
        for stream in [
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(limit.is_stream(stream), "{stream}");
        }
        for unary in [
            "/grpc.health.v1.Health/Check",
            "/identity.v1.UserService/CreateUser",
            "/identity.v1.AuthService/Login",
            "/identity.v1.AccountService/ImportUsers",
            "/metrics",
        ] {
            assert!(!limit.is_stream(unary), "{unary}");
        }
        // Every RPC of identity's own is known, unary or not.
        let methods = rpc_methods();
        assert!(
            methods
                .iter()
                .any(|(p, s)| p == "/identity.v1.AuthService/VerifyToken" && !s)
        );
    }

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5000u"), Some(Duration::from_millis(5)));
        assert_eq!(parse_grpc_timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }
}
