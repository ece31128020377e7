//! Nothing secret reaches the logs: the real binary at `RUST_LOG=trace`,
//! every flow that handles a password or a token, and a scan of every line.

use crate::helpers::{AuthServiceClient, Bearer, TempDir, UserServiceClient};
use crate::lifecycle::{Serve, command};
use identity::proto::identity::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_any_level_holds_a_password_a_hash_or_a_token() {
    let dir = TempDir::new("identity-logs");
    let mut cmd = command(&dir.0.join("data"));
    cmd.env("RUST_LOG", "trace");
    let serve = Serve::start_with(cmd);
    let url = format!("http://{}", serve.addr);
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel.clone());
    let mut auth = AuthServiceClient::new(channel.clone());

    let first = "first secret password";
    let second = "second secret password";
    let wrong = "a wrong secret password";
    users
        .create_user(pb::CreateUserRequest {
            username: "logged".into(),
            email: "logged@example.com".into(),
            password: first.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    auth.login(pb::LoginRequest {
        login: "logged".into(),
        password: wrong.into(),
    })
    .await
    .unwrap_err();
    let t1 = auth
        .login(pb::LoginRequest {
            login: "logged".into(),
            password: first.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    auth.verify_token(pb::VerifyTokenRequest {
        access_token: t1.access_token.clone(),
    })
    .await
    .unwrap();
    let t2 = auth
        .refresh(pb::RefreshRequest {
            refresh_token: t1.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    // Reuse of the retired token, logged as a warning.
    auth.refresh(pb::RefreshRequest {
        refresh_token: t1.refresh_token.clone(),
    })
    .await
    .unwrap_err();
    let t3 = auth
        .login(pb::LoginRequest {
            login: "logged@example.com".into(),
            password: first.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let bearer = Bearer::from_token(&t3.access_token);
    let mut as_user = AuthServiceClient::with_interceptor(channel.clone(), bearer.clone());
    as_user
        .change_password(pb::ChangePasswordRequest {
            current_password: wrong.into(),
            new_password: second.into(),
        })
        .await
        .unwrap_err();
    as_user
        .change_password(pb::ChangePasswordRequest {
            current_password: first.into(),
            new_password: second.into(),
        })
        .await
        .unwrap();
    auth.logout(pb::LogoutRequest {
        refresh_token: t3.refresh_token.clone(),
        all_sessions: true,
    })
    .await
    .unwrap();
    let log = serve.log.clone();
    assert_eq!(serve.terminate(), 0);
    let log = log.lines();
    assert!(log.len() > 50, "trace logging was on: {} lines", log.len());
    let secrets = [
        first,
        second,
        wrong,
        "$argon2",
        &t1.access_token,
        &t1.refresh_token,
        &t2.access_token,
        &t2.refresh_token,
        &t3.access_token,
        &t3.refresh_token,
        // The signature part alone, in case a token is cut or split.
        t1.access_token.rsplit_once('.').unwrap().1,
    ];
    for line in &log {
        for secret in &secrets {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
    }
}
