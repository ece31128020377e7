//! `GET /metrics`: scraped while calls are made.

use crate::auth::http1_get;
use crate::changes::{open_watch, read_changes};
use crate::helpers::{TestUser, spawn_app};
use identity::proto::identity::v1 as pb;

/// The value of the sample `name{labels}` in a Prometheus text exposition.
pub(crate) fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_by_method_and_code_and_show_pool_hashing_and_process() {
    let app = spawn_app().await;
    app.create_user("counted1").await;
    app.create_user("counted2").await;
    let bad = pb::CreateUserRequest {
        username: "x".into(),
        ..TestUser::named("x").request()
    };
    app.users.clone().create_user(bad).await.unwrap_err();
    app.anon
        .users
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();

    let addr = app.addr;
    let (status, headers, body) = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("text/plain"));

    let create = r#"identity_grpc_requests_total{code="Ok",method="CreateUser",service="identity.v1.UserService"}"#;
    let invalid = r#"identity_grpc_requests_total{code="InvalidArgument",method="CreateUser",service="identity.v1.UserService"}"#;
    let refused = r#"identity_grpc_requests_total{code="Unauthenticated",method="ListUsers",service="identity.v1.UserService"}"#;
    assert_eq!(sample(&body, create), Some(2.0), "{body}");
    assert_eq!(sample(&body, invalid), Some(1.0));
    assert_eq!(sample(&body, refused), Some(1.0));
    // Root's login during set-up.
    let login = r#"identity_grpc_requests_total{code="Ok",method="Login",service="identity.v1.AuthService"}"#;
    assert_eq!(sample(&body, login), Some(1.0));
    let latency = r#"identity_grpc_request_duration_seconds_count{method="CreateUser",service="identity.v1.UserService"}"#;
    assert_eq!(sample(&body, latency), Some(3.0));
    for gauge in [
        r#"identity_db_pool_connections{state="in_use"}"#,
        r#"identity_db_pool_connections{state="idle"}"#,
        r#"identity_db_pool_connections{state="waiting"}"#,
        "identity_hash_queue_depth",
        "identity_grpc_open_streams",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(sample(&body, gauge).is_some(), "{gauge} missing");
    }
    assert!(sample(&body, r#"identity_db_pool_connections{state="idle"}"#).unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_counts_its_streams_and_deliveries_with_their_delay() {
    let app = spawn_app().await;
    let mut stream = open_watch(&app.admin, "", &[]).await.unwrap();
    let user = app.create_user("watched").await;
    let (delivered, _) = read_changes(&mut stream, 1).await;
    let delivered = &delivered[0];
    assert_eq!(delivered.user_id, user.id);

    let addr = app.addr;
    let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
        .await
        .unwrap();
    assert_eq!(
        sample(&body, "identity_change_streams"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            r#"identity_changes_delivered_total{kind="user_created"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "identity_change_delivery_seconds_count"),
        Some(1.0)
    );
    assert!(sample(&body, "identity_changes_written_total").is_some_and(|n| n >= 1.0));
    assert!(sample(&body, "identity_change_stream_lag_seconds").is_some());

    drop(stream);
    // The stream's end is counted once the server notices it: scrape until.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
                .await
                .unwrap();
            if sample(&body, "identity_change_streams") == Some(0.0) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the closed stream is still counted");
    // A call the client abandoned is counted, as Cancelled (its status is
    // recorded before the stream's gauge goes down).
    let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
        .await
        .unwrap();
    let cancelled = r#"identity_grpc_requests_total{code="Cancelled",method="WatchChanges",service="identity.v1.ChangeService"}"#;
    assert_eq!(sample(&body, cancelled), Some(1.0), "{body}");
}
