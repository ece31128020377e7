//! The access log (`ACCESS_LOG`, `TRUSTED_PROXIES`), read as an operator
//! reads it: the real binary's JSON lines, one per call, with the RPC, the
//! status code, the duration, the request id, the caller when a credential
//! proved one, the peer, and `x-forwarded-for` only from a trusted proxy;
//! never a credential.

use std::time::Duration;

use tonic::transport::Channel;

use crate::auth::http1_get;
use crate::helpers::{AuthServiceClient, Bearer, TempDir, TestDb, TestUser, UserServiceClient};
use crate::lifecycle::{Serve, command};
use identity::proto::identity::v1 as pb;

/// The binary on its own database, with `env` added.
pub(crate) async fn serve(db: &TestDb, env: &[(&str, &str)]) -> (Serve, Channel, TempDir) {
    let dir = TempDir::new("identity-access");
    let mut cmd = command(&dir.0.join("data"));
    cmd.env("DATABASE_URL", &db.url).envs(env.iter().copied());
    let serve = Serve::start_with(cmd);
    let channel = Channel::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (serve, channel, dir)
}

/// The access log lines among `lines`, parsed.
fn access_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "identity::access")
        .collect()
}

/// The one access line of the call with `request_id`.
fn line_of<'a>(lines: &'a [serde_json::Value], request_id: &str) -> &'a serde_json::Value {
    let found: Vec<_> = lines
        .iter()
        .filter(|v| v["fields"]["request_id"] == request_id)
        .collect();
    assert_eq!(found.len(), 1, "one line for {request_id}: {lines:#?}");
    found[0]
}

fn with_headers<T>(message: T, request_id: &str, forwarded_for: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-forwarded-for", forwarded_for.parse().unwrap());
    request
}

/// Makes the calls whose lines the tests read: a signed-in user's Login,
/// GetUser as that user (request id `get-self`), a VerifyToken with a bad
/// token (`bad-token`); returns the user, the tokens and the password.
async fn calls(channel: &Channel) -> (pb::User, pb::Tokens, String) {
    let person = TestUser::named("access-person");
    let mut users = UserServiceClient::new(channel.clone());
    let user = users
        .create_user(with_headers(person.request(), "create", "203.0.113.9"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let mut auth = AuthServiceClient::new(channel.clone());
    let tokens = auth
        .login(with_headers(
            pb::LoginRequest {
                login: person.username.clone(),
                password: person.password.clone(),
            },
            "login",
            "203.0.113.9",
        ))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let mut me = UserServiceClient::with_interceptor(
        channel.clone(),
        Bearer::from_token(&tokens.access_token),
    );
    me.get_user(with_headers(
        pb::GetUserRequest {
            lookup: Some(pb::get_user_request::Lookup::Id(user.id.clone())),
        },
        "get-self",
        "203.0.113.9, 10.0.0.7",
    ))
    .await
    .unwrap();
    let refused = auth
        .verify_token(with_headers(
            pb::VerifyTokenRequest {
                access_token: format!("{}x", tokens.access_token),
            },
            "bad-token",
            "203.0.113.9",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    (user, tokens, person.password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_is_one_line_with_its_outcome_and_never_a_credential() {
    let db = TestDb::migrated().await;
    let (serve, channel, _dir) = serve(&db, &[("TRUSTED_PROXIES", "10.0.0.0/8,127.0.0.1")]).await;
    let (user, tokens, password) = calls(&channel).await;
    let addr = serve.addr;
    let (status, _, _) = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    // Written when each call ends: wait for the last one's.
    assert!(
        serve
            .log
            .wait_for(0, "\"/metrics\"", Duration::from_secs(10))
    );
    let lines = serve.log.lines();
    let access = access_lines(&lines);

    let get = line_of(&access, "get-self");
    let f = &get["fields"];
    assert_eq!(get["level"], "INFO");
    assert_eq!(f["message"], "call");
    assert_eq!(f["rpc"], "/identity.v1.UserService/GetUser");
    assert_eq!(f["code"], "Ok");
    assert!(f["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{get}");
    assert_eq!(f["caller"], user.id.as_str(), "the token's user");
    let peer: std::net::SocketAddr = f["peer"].as_str().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback(), "{get}");
    // The peer (127.0.0.1) is a trusted proxy: its header is kept as sent.
    assert_eq!(f["forwarded_for"], "203.0.113.9, 10.0.0.7");

    let login = &line_of(&access, "login")["fields"];
    assert_eq!(login["rpc"], "/identity.v1.AuthService/Login");
    assert_eq!(login["code"], "Ok");
    assert!(
        login.get("caller").is_none(),
        "no credential, no caller: {login}"
    );

    let bad = &line_of(&access, "bad-token")["fields"];
    assert_eq!(bad["rpc"], "/identity.v1.AuthService/VerifyToken");
    assert_eq!(bad["code"], "Unauthenticated");
    assert!(bad.get("caller").is_none(), "{bad}");

    let create = &line_of(&access, "create")["fields"];
    assert_eq!(create["code"], "Ok");

    // Plain HTTP: the path and the HTTP status.
    let metrics: Vec<_> = access
        .iter()
        .filter(|v| v["fields"]["rpc"] == "/metrics")
        .collect();
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0]["fields"]["code"], "200");

    // Never a credential, nor the password, in any line.
    for line in &lines {
        for secret in [&tokens.access_token, &tokens.refresh_token, &password] {
            assert!(!line.contains(secret.as_str()), "{line}");
        }
    }
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_ignored_from_a_peer_not_trusted() {
    let db = TestDb::migrated().await;
    // 127.0.0.1 is not in the list.
    let (serve, channel, _dir) = serve(&db, &[("TRUSTED_PROXIES", "10.0.0.0/8")]).await;
    calls(&channel).await;
    assert!(
        serve
            .log
            .wait_for(0, "\"bad-token\"", Duration::from_secs(10))
    );
    let access = access_lines(&serve.log.lines());
    for id in ["create", "login", "get-self", "bad-token"] {
        let f = &line_of(&access, id)["fields"];
        assert!(f.get("forwarded_for").is_none(), "{f}");
        assert!(f.get("peer").is_some(), "{f}");
    }
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_writes_no_line() {
    let db = TestDb::migrated().await;
    let (serve, channel, _dir) = serve(&db, &[("ACCESS_LOG", "off")]).await;
    calls(&channel).await;
    // A last call whose own log line says every call before it has ended.
    UserServiceClient::new(channel.clone())
        .create_user(TestUser::named("the-last-one").request())
        .await
        .unwrap();
    assert!(
        serve
            .log
            .wait_for(0, "user created", Duration::from_secs(10))
    );
    assert!(
        serve
            .log
            .wait_for_count(0, "user created", 2, Duration::from_secs(10))
    );
    assert!(access_lines(&serve.log.lines()).is_empty());
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_can_silence_the_access_log_as_any_target() {
    // RUST_LOG's directive for the target, as for any line.
    let db = TestDb::migrated().await;
    let (quiet, channel, _dir) = serve(&db, &[("RUST_LOG", "info,identity::access=off")]).await;
    UserServiceClient::new(channel.clone())
        .create_user(TestUser::named("silenced").request())
        .await
        .unwrap();
    assert!(
        quiet
            .log
            .wait_for(0, "user created", Duration::from_secs(10))
    );
    UserServiceClient::new(channel)
        .create_user(TestUser::named("silenced-2").request())
        .await
        .unwrap();
    assert!(
        quiet
            .log
            .wait_for_count(0, "user created", 2, Duration::from_secs(10))
    );
    assert!(access_lines(&quiet.log.lines()).is_empty());
    drop(quiet);
}
