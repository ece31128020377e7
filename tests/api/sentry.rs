//! Sentry: an INTERNAL error reaches a Sentry stand-in on 127.0.0.1 with the
//! RPC, request id and release, and without secrets.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tonic::Code;

use crate::helpers::{AuthServiceClient, TempDir, TestDb, TestUser, UserServiceClient};
use crate::lifecycle::{Serve, command};
use identity::proto::identity::v1 as pb;

/// A stand-in for Sentry's ingestion endpoint: every request body it gets
/// (an envelope) goes to the channel.
async fn sentry_stand_in() -> (String, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // Headers, then as many body bytes as Content-Length says.
                let (head_end, length) = loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (pos + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let _ = tx.send((head, buf[head_end..].to_vec()));
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                    .await;
            });
        }
    });
    (format!("http://publickey@{addr}/1"), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_error_is_reported_to_sentry_without_secrets() {
    use diesel_async::SimpleAsyncConnection;
    let (dsn, mut envelopes) = sentry_stand_in().await;
    let db = TestDb::migrated().await;
    let dir = TempDir::new("identity-sentry");
    let mut cmd = command(&dir.0.join("data"));
    cmd.env("DATABASE_URL", &db.url).env("SENTRY_DSN", &dsn);
    let serve = Serve::start_with(cmd);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let password = TestUser::named("broken").password;
    UserServiceClient::new(channel.clone())
        .create_user(TestUser::named("broken").request())
        .await
        .unwrap();
    // The service's own fault: a stored hash it cannot read.
    db.connect()
        .await
        .batch_execute(
            "UPDATE users SET password_hash = 'not-a-phc-string' WHERE username = 'broken'",
        )
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::LoginRequest {
        login: "broken".into(),
        password: password.clone(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-sentry-1".parse().unwrap());
    request.metadata_mut().insert(
        "authorization",
        "Bearer not-a-real-token-but-secret".parse().unwrap(),
    );
    let status = AuthServiceClient::new(channel)
        .login(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(
        status.message(),
        "internal error",
        "no source text for the client"
    );

    let event = loop {
        let (head, body) = tokio::time::timeout(Duration::from_secs(30), envelopes.recv())
            .await
            .expect("an envelope within 30 s")
            .unwrap();
        assert!(head.contains("/api/1/envelope/"), "{head}");
        let text = String::from_utf8_lossy(&body).into_owned();
        if let Some(event) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            // The event item: errors are Sentry's default level, not spelled out.
            .find(|v| v.get("tags").is_some() && v.get("level").is_none_or(|l| l == "error"))
        {
            for secret in [password.as_str(), "not-a-real-token-but-secret", "Bearer"] {
                assert!(!text.contains(secret), "a secret went to Sentry: {text}");
            }
            break event;
        }
    };
    assert_eq!(event["tags"]["rpc"], "/identity.v1.AuthService/Login");
    assert_eq!(event["tags"]["request_id"], "req-sentry-1");
    assert!(
        event["release"].as_str().is_some_and(|r| !r.is_empty()),
        "{event}"
    );
    assert_eq!(serve.terminate(), 0);
}
