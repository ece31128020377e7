//! Traces: a W3C `traceparent` continues into the call's span, its trace id
//! is in every log line of the call, and with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! the spans reach a stand-in OTLP collector run here (the published
//! OTLP/gRPC protocol, from `opentelemetry-proto`), as an operator would
//! read them in a trace viewer.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::access_log::serve;
use crate::helpers::{AuthServiceClient, TestDb, TestUser, UserServiceClient};
use crate::lifecycle::Serve;
use identity::proto::identity::v1 as pb;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// The collector: every span exported to it, with its resource's
/// attributes.
struct Collector {
    spans: mpsc::UnboundedSender<(Vec<KeyValue>, Span)>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.spans.send((resource.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the collector on a port of its own.
async fn collector() -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<(Vec<KeyValue>, Span)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector { spans: tx }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// CreateUser with the caller's trace context and a request id.
async fn traced_create(channel: &Channel, username: &str, request_id: &str) -> pb::User {
    let mut request = tonic::Request::new(TestUser::named(username).request());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01").parse().unwrap(),
    );
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    UserServiceClient::new(channel.clone())
        .create_user(request)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

/// The JSON log lines of the call with `request_id` (its span's lines).
fn lines_of_call(serve: &Serve, request_id: &str) -> Vec<serde_json::Value> {
    serve
        .log
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| s["request_id"] == request_id))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_and_reach_the_collector() {
    let (collector_addr, mut spans) = collector().await;
    let db = TestDb::migrated().await;
    let endpoint = format!("http://{collector_addr}");
    let (serve, channel, _dir) = serve(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Batches leave every 50 ms rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let user = traced_create(&channel, "traced-person", "traced-call").await;
    // A refused call, without a trace context of its own.
    let refused = AuthServiceClient::new(channel.clone())
        .verify_token(pb::VerifyTokenRequest {
            access_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // Spans arrive as they are exported: read until both calls' are here.
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(span) = spans.recv().await {
            seen.push(span);
            let names: Vec<&str> = seen.iter().map(|(_, s)| s.name.as_str()).collect();
            if names.contains(&"identity.v1.UserService/CreateUser")
                && names.contains(&"identity.v1.AuthService/VerifyToken")
            {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "spans seen: {seen:#?}");

    let (resource, create) = seen
        .iter()
        .find(|(_, s)| s.name == "identity.v1.UserService/CreateUser")
        .unwrap();
    assert_eq!(
        attribute(resource, "service.name"),
        Some(&Value::StringValue("identity".into()))
    );
    // The caller's trace, under the caller's span.
    assert_eq!(hex(&create.trace_id), TRACE_ID);
    assert_eq!(hex(&create.parent_span_id), PARENT_ID);
    assert_eq!(create.kind, SpanKind::Server as i32);
    let a = &create.attributes;
    assert_eq!(
        attribute(a, "rpc.system"),
        Some(&Value::StringValue("grpc".into()))
    );
    assert_eq!(
        attribute(a, "rpc.service"),
        Some(&Value::StringValue("identity.v1.UserService".into()))
    );
    assert_eq!(
        attribute(a, "rpc.method"),
        Some(&Value::StringValue("CreateUser".into()))
    );
    assert_eq!(
        attribute(a, "rpc.grpc.status_code"),
        Some(&Value::IntValue(0))
    );
    assert_eq!(
        attribute(a, "request_id"),
        Some(&Value::StringValue("traced-call".into()))
    );
    assert!(create.end_time_unix_nano > create.start_time_unix_nano);

    // The use case's own span, a child of the call's, in the same trace.
    let children: Vec<&Span> = seen
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.parent_span_id == create.span_id)
        .collect();
    assert!(!children.is_empty(), "the call's inner spans: {seen:#?}");
    assert!(children.iter().all(|s| hex(&s.trace_id) == TRACE_ID));

    // Without a traceparent: a trace of its own, rooted here.
    let (_, verify) = seen
        .iter()
        .find(|(_, s)| s.name == "identity.v1.AuthService/VerifyToken")
        .unwrap();
    assert_ne!(hex(&verify.trace_id), TRACE_ID);
    assert!(verify.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        attribute(&verify.attributes, "rpc.grpc.status_code"),
        Some(&Value::IntValue(tonic::Code::Unauthenticated as i64))
    );

    // Every log line of the traced call carries its trace id. The access
    // line is the call's last, written once its answer has gone: waited
    // for, the others are in before it.
    assert!(
        serve.log.wait_until(
            0,
            |l| l.contains("\"target\":\"identity::access\"")
                && l.contains("\"request_id\":\"traced-call\""),
            std::time::Duration::from_secs(10)
        ),
        "the traced call's access line"
    );
    let lines = lines_of_call(&serve, "traced-call");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "user created"
                && l["fields"]["user_id"] == user.id.as_str()),
        "{lines:#?}"
    );
    // The access line is one of its own, outside the span: its fields
    // carry the request id and the trace id.
    let access: Vec<serde_json::Value> = serve
        .log
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "identity::access" && v["fields"]["request_id"] == "traced-call")
        .collect();
    assert_eq!(access.len(), 1, "{access:#?}");
    assert_eq!(access[0]["fields"]["trace_id"], TRACE_ID);
    for line in &lines {
        let rpc = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "rpc")
            .unwrap();
        assert_eq!(rpc["trace_id"], TRACE_ID, "{line}");
    }
    // Nor is any credential an attribute of any span.
    for (_, span) in &seen {
        for kv in &span.attributes {
            assert_ne!(kv.key, "authorization");
        }
    }
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_the_callers_trace_id_is_still_logged() {
    let db = TestDb::migrated().await;
    let (serve, channel, _dir) = serve(&db, &[]).await;
    traced_create(&channel, "logged-trace", "logged-call").await;
    assert!(
        serve
            .log
            .wait_for(0, "\"logged-call\"", Duration::from_secs(10))
    );
    // The access line, the call's last, is written when it ends.
    assert!(
        serve
            .log
            .wait_for(0, "identity::access", Duration::from_secs(10))
    );
    let lines = lines_of_call(&serve, "logged-call");
    assert!(!lines.is_empty(), "{lines:#?}");
    for line in &lines {
        assert!(line.to_string().contains(TRACE_ID), "{line}");
    }
    let access = serve
        .log
        .lines()
        .into_iter()
        .find(|l| l.contains("identity::access") && l.contains("\"logged-call\""))
        .expect("the call's access line");
    assert!(access.contains(TRACE_ID), "{access}");
    // A malformed traceparent is ignored: no trace id, the call proceeds.
    let mut request = tonic::Request::new(TestUser::named("bad-trace").request());
    request
        .metadata_mut()
        .insert("traceparent", "00-nonsense-01".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-request-id", "bad-trace-call".parse().unwrap());
    UserServiceClient::new(channel.clone())
        .create_user(request)
        .await
        .unwrap();
    drop(serve);
}
