//! Limits around every call, as tower layers: a deadline (the server's
//! maximum, or the client's shorter `grpc-timeout`), a cap on the request
//! body, and (in `app/mod.rs`) a global concurrency limit that sheds load
//! instead of queueing it.
//!
//! Streams (health Watch, reflection, any RPC whose descriptor says it
//! streams) are bounded apart, in `streams`, by [`StreamLimit`]: the unary limits above
//! guard only the future of a call's response headers, which a stream
//! returns at once and then lives on in its body. A stream holds a permit of
//! `MAX_STREAMS` until its body ends, is exempt from the deadline and from
//! the unary concurrency limit, and ends with OK when shutdown begins.
//!
//! [`StreamLimit`]: crate::limits::StreamLimit

mod refusals;
mod streams;

pub use refusals::{Cause, LOG_EVERY, Refusals};
pub use streams::{StreamCall, StreamLayer, StreamLimit, Streams, rpc_methods};

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

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

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
/// before it is buffered; counted in `refusals` as
/// [`Cause::MessageTooLarge`].
#[derive(Debug, Clone)]
pub struct BodyLimitLayer {
    max: usize,
    refusals: Refusals,
}

impl BodyLimitLayer {
    /// A limit of `max` bytes per request body (for unary gRPC calls: one
    /// message and its 5-byte frame header).
    pub fn new(max: usize, refusals: Refusals) -> Self {
        Self { max, refusals }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
            refusals: self.refusals.clone(),
        }
    }
}

/// The service of [`BodyLimitLayer`].
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: usize,
    refusals: Refusals,
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
        let refusals = self.refusals.clone();
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(Limited {
                inner: body,
                left: max,
                max,
                refusals,
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
    refusals: Refusals,
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
                        this.refusals.refuse(Cause::MessageTooLarge);
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
/// Shed calls are counted in `refusals` as [`Cause::LoadShed`].
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    refusals: Refusals,
}

impl ShedLayer {
    /// A limit of `max` calls in flight.
    pub fn new(max: usize, refusals: Refusals) -> Self {
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            refusals,
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
            refusals: self.refusals.clone(),
        }
    }
}

/// The service of [`ShedLayer`].
#[derive(Debug, Clone)]
pub struct Shed<S> {
    direct: S,
    limited: tower::load_shed::LoadShed<tower::limit::ConcurrencyLimit<S>>,
    refusals: Refusals,
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
        let refusals = self.refusals.clone();
        Box::pin(async move {
            match limited.oneshot(request).await {
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                    use tonic_types::{ErrorDetails, StatusExt};
                    tracing::debug!("at capacity: call shed");
                    refusals.refuse(Cause::LoadShed);
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

#[cfg(test)]
mod tests {
    use super::*;

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
