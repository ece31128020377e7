//! Limits: message size, deadlines (server maximum and client grpc-timeout),
//! global concurrency with load shedding, bounded hashing.

use std::time::Duration;

use tonic::{Code, IntoRequest};
use tonic_types::StatusExt;

use crate::helpers::{TestDb, TestUser, spawn_app, spawn_app_on, spawn_app_without_login};
use crate::metrics::sample;
use identity::proto::identity::v1 as pb;

/// argon2 parameters that make one hash take a good fraction of a second,
/// so that a call is reliably still running when the next one arrives.
fn slow_hashing(c: &mut identity::config::Config) {
    c.argon2_memory_kib = 65_536;
    c.argon2_iterations = 12;
}

#[tokio::test]
async fn a_message_over_64_kib_is_resource_exhausted() {
    let app = spawn_app().await;
    let mut req = TestUser::named("big").request();
    req.first_name = "x".repeat(70 * 1024);
    let status = app.users.clone().create_user(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Just under the limit, the message reaches the handler (and its rules).
    let mut req = TestUser::named("big").request();
    req.first_name = "x".repeat(60 * 1024);
    let status = app.users.clone().create_user(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let body = crate::metrics::scrape(app.addr).await;
    let too_large = r#"identity_resource_exhausted_total{cause="message_too_large"}"#;
    assert_eq!(sample(&body, too_large), Some(1.0), "{body}");
}

/// Calls CreateUser over a bare h2 connection with a `grpc-timeout` header,
/// so that only the server can enforce it (tonic's client would cancel on
/// its own); returns the grpc-status.
async fn create_user_with_grpc_timeout(
    addr: std::net::SocketAddr,
    req: pb::CreateUserRequest,
    timeout: &str,
) -> String {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let message = req.encode_to_vec();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let request = http::Request::post(format!("http://{addr}/identity.v1.UserService/CreateUser"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(bytes::Bytes::from(body), true).unwrap();
    let response = response.await.unwrap();
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap().to_owned();
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_cancels_the_call() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| {
        slow_hashing(c);
        c.hash_concurrency = std::num::NonZeroUsize::new(1);
    })
    .await;
    let status =
        create_user_with_grpc_timeout(app.addr, TestUser::named("hurried").request(), "20m").await;
    assert_eq!(status, (Code::DeadlineExceeded as i32).to_string());

    // And with tonic's client, which also cancels on its own side.
    let mut req = TestUser::named("hurried2").request().into_request();
    req.set_timeout(Duration::from_millis(20));
    let status = app.users.clone().create_user(req).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // The next hash starts only when the cancelled call's hash is done, so
    // once this call returns, the cancelled one would have written by now.
    app.users
        .clone()
        .create_user(TestUser::named("patient").request())
        .await
        .unwrap();
    let status = app
        .users
        .clone()
        .get_user(pb::GetUserRequest {
            lookup: Some(pb::get_user_request::Lookup::Username("hurried".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "the cancelled call wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_bounds_every_call_by_its_own_maximum() {
    let db = TestDb::migrated().await;
    let app = spawn_app_without_login(db, |c| {
        slow_hashing(c);
        c.request_timeout = Duration::from_millis(30);
    })
    .await;
    let status = app
        .anon
        .users
        .clone()
        .create_user(TestUser::named("slowpoke").request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_concurrency_limit_are_shed_not_queued() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| {
        slow_hashing(c);
        c.max_concurrent_requests = 1;
    })
    .await;
    let calls = (0..8).map(|i| {
        let mut users = app.users.clone();
        async move {
            users
                .create_user(TestUser::named(&format!("crowd{i}")).request())
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let shed = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .count();
    assert!(ok >= 1 && shed >= 1, "{results:?}");
    assert_eq!(ok + shed, 8, "nothing but served or shed: {results:?}");
    // Each shed call is counted under its cause, and no other cause.
    let body = crate::metrics::scrape(app.addr).await;
    let refused = |cause: &str| {
        sample(
            &body,
            &format!(r#"identity_resource_exhausted_total{{cause="{cause}"}}"#),
        )
    };
    assert_eq!(refused("load_shed"), Some(shed as f64), "{body}");
    assert_eq!(refused("hash_queue"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hashing_queue_refuses_logins_but_not_token_checks() {
    // The user's hash is made with the slow parameters, so that every
    // login's check holds the one hashing thread long enough for the
    // others to meet a full queue (with a fast stored hash, the checks
    // could all finish before any two overlapped).
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| {
        slow_hashing(c);
        c.hash_concurrency = std::num::NonZeroUsize::new(1);
        c.hash_queue = 1;
    })
    .await;
    let (_, tokens) = app.signed_in_user("steady").await;
    let password = TestUser::named("steady").password;
    let logins = (0..6).map(|_| app.login("steady", &password));
    let verify = async {
        app.anon
            .auth
            .clone()
            .verify_token(pb::VerifyTokenRequest {
                access_token: tokens.access_token.clone(),
            })
            .await
    };
    let (results, verified) = tokio::join!(futures::future::join_all(logins), verify);
    assert!(verified.is_ok(), "VerifyToken needs no hashing slot");
    let refused: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|s| s.code() == Code::ResourceExhausted)
        .collect();
    assert!(!refused.is_empty(), "{results:?}");
    assert!(refused.iter().all(|s| s.get_details_retry_info().is_some()));
    let body = crate::metrics::scrape(app.addr).await;
    assert_eq!(
        sample(
            &body,
            r#"identity_resource_exhausted_total{cause="hash_queue"}"#
        ),
        Some(refused.len() as f64),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_refused_for_hashing_capacity_does_not_count_towards_a_lock() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| {
        slow_hashing(c);
        c.hash_concurrency = std::num::NonZeroUsize::new(1);
        c.hash_queue = 1;
    })
    .await;
    // Its hash is slow to check, like any made with these parameters.
    let user = app.create_user("busy").await;
    // Four wrong passwords at once (fewer than the five that lock): one is
    // checked, one may wait, the rest find no hashing capacity.
    let results =
        futures::future::join_all((0..4).map(|_| app.login("busy", "wrong password!"))).await;
    let checked = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|s| s.code() == Code::Unauthenticated))
        .count();
    let no_capacity = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .count();
    assert_eq!(checked + no_capacity, 4, "{results:?}");
    assert!(no_capacity >= 1, "{results:?}");
    let counted = crate::auth::failures_of(&app, &format!("user:{}", user.id))
        .await
        .unwrap_or(0);
    assert_eq!(counted as usize, checked, "only checked passwords count");
}

/// The server's SETTINGS, read off a raw connection: the client preface and
/// an empty SETTINGS frame out, frames in until the server's own (not an
/// ACK). Pairs of identifier and value (RFC 9113, 6.5).
async fn server_settings(addr: std::net::SocketAddr) -> Vec<(u16, u32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // Length 0, type 0x4 (SETTINGS), no flags, stream 0.
    tcp.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
    loop {
        let mut header = [0u8; 9];
        tcp.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        let (kind, flags) = (header[3], header[4]);
        if kind == 0x4 && flags & 0x1 == 0 {
            return payload
                .chunks_exact(6)
                .map(|s| {
                    (
                        u16::from_be_bytes([s[0], s[1]]),
                        u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                    )
                })
                .collect();
        }
    }
}

/// SETTINGS_MAX_CONCURRENT_STREAMS.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

#[tokio::test]
async fn the_server_advertises_a_limit_of_streams_per_connection() {
    let app = spawn_app().await;
    let settings = server_settings(app.addr).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 200)),
        "200 by default: {settings:?}"
    );

    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.http2_max_concurrent_streams = 7).await;
    let settings = server_settings(app.addr).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 7)),
        "HTTP2_MAX_CONCURRENT_STREAMS: {settings:?}"
    );
}

/// A health Watch of the whole server, with its first answer read: the
/// stream is open on the server when this returns.
async fn open_watch(
    channel: &tonic::transport::Channel,
) -> Result<tonic::Streaming<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut stream = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    stream.message().await?.expect("a first status");
    Ok(stream)
}

/// A reflection stream (v1, both ways) whose requests stay open until the
/// returned sender is dropped; its first answer read.
async fn open_reflection(
    channel: &tonic::transport::Channel,
) -> Result<
    (
        tokio::sync::mpsc::Sender<tonic_reflection::pb::v1::ServerReflectionRequest>,
        tonic::Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
    ),
    tonic::Status,
> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .await
    .unwrap();
    let mut stream = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?.expect("a first answer");
    Ok((tx, stream))
}

/// `identity serve` on a test database, with `env`, and a channel to it.
pub(crate) async fn serve_with(
    db: &TestDb,
    dir: &crate::helpers::TempDir,
    env: &[(&str, &str)],
) -> (crate::lifecycle::Serve, tonic::transport::Channel) {
    let mut cmd = crate::lifecycle::command(&dir.0.join("data"));
    cmd.env("DATABASE_URL", &db.url);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let serve = crate::lifecycle::Serve::start_with(cmd);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (serve, channel)
}

/// The open-streams gauge of `/metrics`.
async fn open_streams(addr: std::net::SocketAddr) -> f64 {
    let (_, _, body) =
        tokio::task::spawn_blocking(move || crate::auth::http1_get(addr, "/metrics"))
            .await
            .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("identity_grpc_open_streams "))
        .and_then(|v| v.parse().ok())
        .expect("the open-streams gauge")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_max_streams_are_refused_until_one_closes() {
    let db = TestDb::migrated().await;
    let dir = crate::helpers::TempDir::new("identity-streams");
    let (serve, channel) = serve_with(
        &db,
        &dir,
        &[
            ("MAX_STREAMS", "2"),
            // Streams are not calls: they leave this one free.
            ("MAX_CONCURRENT_REQUESTS", "1"),
            ("RUST_LOG", "info,identity::limits=debug"),
        ],
    )
    .await;

    let first = open_watch(&channel).await.unwrap();
    let _second = open_watch(&channel).await.unwrap();
    let third = open_watch(&channel).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    let reflection = open_reflection(&channel).await.unwrap_err();
    assert_eq!(
        reflection.code(),
        Code::ResourceExhausted,
        "reflection counts too"
    );
    assert_eq!(open_streams(serve.addr).await, 2.0);
    // Told apart from the other causes: by a metric, and at the default
    // level by a line (the first at once; the second within its 10 s).
    let body = crate::metrics::scrape(serve.addr).await;
    assert_eq!(
        sample(
            &body,
            r#"identity_resource_exhausted_total{cause="stream_limit"}"#
        ),
        Some(2.0),
        "{body}"
    );
    let refusal_lines = || -> Vec<serde_json::Value> {
        serve
            .log
            .lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "calls refused with RESOURCE_EXHAUSTED")
            .collect()
    };
    let needle = "calls refused with RESOURCE_EXHAUSTED";
    assert!(
        serve
            .log
            .wait_for_count(0, needle, 2, Duration::from_secs(30)),
        "{:#?}",
        serve.log.lines()
    );
    let lines = refusal_lines();
    for (line, total) in lines.iter().zip([1, 2]) {
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["fields"]["cause"], "stream_limit");
        assert_eq!(line["fields"]["refused"], 1, "one since the last line");
        assert_eq!(line["fields"]["total"], total);
    }
    // Unary calls go on, under their own limit.
    crate::helpers::AuthServiceClient::new(channel.clone())
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap();

    // The client goes away; the server sees it (its log says when).
    let seen = serve.log.len();
    drop(first);
    assert!(
        serve
            .log
            .wait_for(seen, "stream ended", Duration::from_secs(30)),
        "the server noticed the closed stream"
    );
    let _again = open_watch(&channel).await.unwrap();
    let full = open_watch(&channel).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert_eq!(serve.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_request_timeout() {
    let db = TestDb::migrated().await;
    let app = spawn_app_without_login(db, |c| {
        slow_hashing(c);
        c.request_timeout = Duration::from_millis(200);
    })
    .await;
    let mut watch = open_watch(&app.channel).await.unwrap();
    // A call that outlasts REQUEST_TIMEOUT, begun after the stream was
    // opened: once it is cut off, the stream is older than the timeout.
    let status = app
        .anon
        .users
        .clone()
        .create_user(TestUser::named("slowpoke").request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);

    // Still open: it hears the database go away.
    let name = &app.db.name;
    app.db
        .admin(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    loop {
        let message = watch.message().await.expect("the stream is still open");
        if message.expect("no end").status == not_serving {
            break;
        }
    }
    app.db
        .admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_with_ok_at_shutdown_well_within_the_grace_period() {
    let db = TestDb::migrated().await;
    let dir = crate::helpers::TempDir::new("identity-stream-stop");
    let grace = Duration::from_secs(60);
    let (serve, channel) = serve_with(&db, &dir, &[("SHUTDOWN_GRACE", "60s")]).await;
    let mut watch = open_watch(&channel).await.unwrap();
    // Its client keeps its side open.
    let (_requests, mut reflection) = open_reflection(&channel).await.unwrap();

    let started = std::time::Instant::now();
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let ended = async {
        // NOT_SERVING first, maybe; then the end, with OK.
        while let Some(message) = watch.message().await.expect("the watch ends with OK") {
            assert_ne!(
                message.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            );
        }
        assert!(
            reflection
                .message()
                .await
                .expect("reflection ends with OK")
                .is_none()
        );
    };
    tokio::time::timeout(grace / 4, ended)
        .await
        .expect("the streams ended well within the grace period");
    let code = tokio::time::timeout(grace / 4, tokio::task::spawn_blocking(|| serve.wait()))
        .await
        .expect("the service exited well within the grace period")
        .unwrap();
    assert_eq!(code, 0);
    assert!(started.elapsed() < grace / 4);
}
