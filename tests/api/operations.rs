//! Operating identity: key rotation on a running server (SIGHUP), and two
//! replicas on one database behaving as one service.

use std::{path::Path, process::Command, time::Duration};

use nix::sys::signal::Signal;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::helpers::{AuthServiceClient, Bearer, TempDir, TestDb, TestUser, UserServiceClient};
use crate::lifecycle::{Serve, command};
use identity::proto::identity::v1 as pb;

const PASSWORD: &str = "correct horse battery staple";

async fn channel(serve: &Serve) -> Channel {
    Channel::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn login(serve: &Serve, username: &str, password: &str) -> Result<pb::Tokens, tonic::Status> {
    AuthServiceClient::new(channel(serve).await)
        .login(pb::LoginRequest {
            login: username.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().tokens.unwrap())
}

async fn verify(serve: &Serve, token: &str) -> Result<pb::VerifyTokenResponse, tonic::Status> {
    AuthServiceClient::new(channel(serve).await)
        .verify_token(pb::VerifyTokenRequest {
            access_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

fn keys_cli(keys: &Path, action: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_identity"))
        .args(["keys", action])
        .env("KEYS_DIR", keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends SIGHUP and waits for the "keys reloaded" line it causes.
fn hangup_and_wait(serve: &Serve) {
    let seen = serve.log.len();
    serve.signal(Signal::SIGHUP);
    assert!(
        serve
            .log
            .wait_for(seen, "keys reloaded", Duration::from_secs(30)),
        "no reload after SIGHUP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_on_a_running_server_signs_while_the_old_one_verifies_until_retired() {
    let dir = TempDir::new("identity-rotate");
    let mut cmd = command(&dir.0.join("data"));
    cmd.env("KEYS_ACTIVATION_DELAY", "0s");
    let serve = Serve::start_with(cmd);
    let keys = dir.0.join("keys");
    UserServiceClient::new(channel(&serve).await)
        .create_user(TestUser::named("rotated").request())
        .await
        .unwrap();
    let old = login(&serve, "rotated", PASSWORD).await.unwrap();
    let old_kid = kid(&old.access_token);
    let old_file = crate::helpers::pem_files(&keys).remove(0);

    keys_cli(&keys, "rotate");
    hangup_and_wait(&serve);

    let published = AuthServiceClient::new(channel(&serve).await)
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.keys.len(), 2);
    let new_kid = published.keys[0].key_id.clone();
    assert_ne!(new_kid, old_kid, "the new key signs");
    assert_eq!(published.keys[1].key_id, old_kid);
    assert!(published.jwks_json.contains(&old_kid) && published.jwks_json.contains(&new_kid));
    let addr = serve.addr;
    let (_, _, pem) = tokio::task::spawn_blocking(move || crate::auth::http1_get(addr, "/pub-key"))
        .await
        .unwrap();
    assert_eq!(
        pem, published.keys[0].pem,
        "/pub-key serves the new signing key"
    );

    let new = login(&serve, "rotated", PASSWORD).await.unwrap();
    assert_eq!(kid(&new.access_token), new_kid);
    assert!(
        verify(&serve, &old.access_token).await.is_ok(),
        "old tokens verify"
    );

    // The operator retires the old key once its tokens have expired.
    std::fs::remove_file(old_file).unwrap();
    hangup_and_wait(&serve);
    let status = verify(&serve, &old.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "TOKEN_SIGNATURE"
    );
    assert!(verify(&serve, &new.access_token).await.is_ok());
    assert_eq!(serve.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_behave_as_one_service() {
    let db = TestDb::migrated().await;
    let dir = TempDir::new("identity-replicas");
    let replica = |name: &str| {
        let mut cmd = command(&dir.0.join(name));
        cmd.env("DATABASE_URL", &db.url)
            .env("KEYS_DIR", dir.0.join("shared-keys"));
        cmd
    };
    // The first creates the shared key; the second finds it.
    let a = Serve::start_with(replica("a"));
    let b = Serve::start_with(replica("b"));

    UserServiceClient::new(channel(&a).await)
        .create_user(TestUser::named("roamer").request())
        .await
        .unwrap();

    // A token from one verifies on the other.
    let t1 = login(&a, "roamer", PASSWORD).await.unwrap();
    let verified = verify(&b, &t1.access_token).await.unwrap();
    assert_eq!(verified.user.unwrap().username, "roamer");

    // A refresh on one retires the token for all: B sees the reuse.
    let t2 = AuthServiceClient::new(channel(&a).await)
        .refresh(pb::RefreshRequest {
            refresh_token: t1.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let reuse = AuthServiceClient::new(channel(&b).await)
        .refresh(pb::RefreshRequest {
            refresh_token: t1.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reuse.code(), Code::Unauthenticated);
    assert!(
        verify(&a, &t2.access_token).await.is_err(),
        "reuse on B ended the session on A"
    );

    // A logout on one is seen by all.
    let t3 = login(&b, "roamer", PASSWORD).await.unwrap();
    assert!(verify(&a, &t3.access_token).await.is_ok());
    AuthServiceClient::with_interceptor(channel(&a).await, Bearer::default())
        .logout(pb::LogoutRequest {
            refresh_token: t3.refresh_token.clone(),
            all_sessions: false,
        })
        .await
        .unwrap();
    assert!(verify(&b, &t3.access_token).await.is_err());

    // Throttling counts across replicas.
    for serve in [&a, &b, &a, &b, &a] {
        assert_eq!(
            login(serve, "roamer", "wrong password!")
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        login(&b, "roamer", PASSWORD).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    assert_eq!(a.terminate(), 0);
    assert_eq!(b.terminate(), 0);
}
