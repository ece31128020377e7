//! Server streams, bounded apart from unary calls: `MAX_STREAMS` permits,
//! each held until a stream's body ends; streams are exempt from the
//! deadline and the unary concurrency limit, and end with OK when shutdown
//! begins. Which RPCs stream is read from the descriptor sets.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::{BoxFuture, Cause, Refusals};

/// Every RPC the server registers, as its path ("/package.Service/Method")
/// and whether it streams (from the server, the client or both): read from
/// the descriptor sets of identity, Envoy's ext_authz, health and
/// reflection (v1 and v1alpha),
/// so that a streaming RPC added to `proto/` is known as one at once.
pub fn rpc_methods() -> Vec<(String, bool)> {
    use prost::Message;
    let mut methods = Vec::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        crate::proto::ENVOY_DESCRIPTOR_SET,
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
/// more is refused at once with RESOURCE_EXHAUSTED (counted as
/// [`Cause::StreamLimit`]). [`StreamLimit::close`]
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
    refusals: Refusals,
}

impl StreamLimit {
    /// A limit of `max` open streams; refusals counted in `refusals`.
    pub fn new(max: usize, refusals: Refusals) -> Self {
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
                refusals,
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
            inner.refusals.refuse(Cause::StreamLimit);
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
        let limit = StreamLimit::new(1, Refusals::default());
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
}
