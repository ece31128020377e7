//! AuthService: logins, tokens checked offline and fresh, sessions, refresh
//! rotation and reuse, logout, password changes, throttling, and the attack
//! list of issue #3.

use std::{
    io::{Read, Write},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Lookup, TestApp, TestUser, reason, spawn_app};
use identity::proto::identity::v1 as pb;

const PASSWORD: &str = "correct horse battery staple";

fn parts(token: &str) -> (Value, Value) {
    let mut it = token.split('.');
    let header = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
    let payload = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
    (
        serde_json::from_slice(&header).unwrap(),
        serde_json::from_slice(&payload).unwrap(),
    )
}

async fn verify(app: &TestApp, token: &str) -> Result<pb::VerifyTokenResponse, tonic::Status> {
    app.anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// An authenticated RPC as the token's holder: GetUser of itself.
async fn get_self(app: &TestApp, token: &str, id: &str) -> Result<pb::User, tonic::Status> {
    app.as_token(token).get_user(Lookup::Id(id)).await
}

async fn refresh(app: &TestApp, token: &str) -> Result<pb::RefreshResponse, tonic::Status> {
    app.anon
        .auth
        .clone()
        .refresh(pb::RefreshRequest {
            refresh_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Both the VerifyToken answer and an authenticated call refuse `token`
/// with UNAUTHENTICATED and the reason `expected`.
async fn assert_refused(app: &TestApp, token: &str, user_id: &str, expected: &str) {
    let status = verify(app, token).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "VerifyToken: {status:?}"
    );
    assert_eq!(reason(&status), expected, "VerifyToken reason");
    let status = get_self(app, token, user_id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "GetUser: {status:?}");
    assert_eq!(reason(&status), expected, "GetUser reason");
}

#[tokio::test]
async fn login_returns_a_token_pair_and_the_user() {
    let app = spawn_app().await;
    let user = app.create_user("alice").await;
    for login in ["alice", "ALICE", &user.email.to_uppercase()] {
        let resp = app.login(login, PASSWORD).await.unwrap();
        assert_eq!(resp.user.unwrap(), user);
        let tokens = resp.tokens.unwrap();
        assert_eq!(tokens.token_type, "Bearer");
        assert!(URL_SAFE_NO_PAD.decode(&tokens.refresh_token).unwrap().len() >= 32);
        let access_exp = tokens.access_token_expire_time.unwrap().seconds;
        let refresh_exp = tokens.refresh_token_expire_time.unwrap().seconds;
        let now = chrono::Utc::now().timestamp();
        assert!((access_exp - now - 15 * 60).abs() <= 5, "15 minutes");
        assert!((refresh_exp - now - 30 * 24 * 3600).abs() <= 5, "30 days");
    }
}

#[tokio::test]
async fn access_tokens_carry_the_contract_claims() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("bob").await;
    let (header, claims) = parts(&tokens.access_token);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "EdDSA");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(claims["iss"], "identity");
    assert_eq!(claims["aud"], "identity");
    assert_eq!(claims["sub"], user.id.as_str());
    assert_eq!(claims["username"], "bob");
    assert_eq!(claims["email"], user.email.as_str());
    assert_eq!(claims["is_superuser"], false);
    assert_eq!(claims["is_active"], true);
    assert_eq!(claims["is_verified"], false);
    assert_eq!(claims["groups"], json!([]));
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["nbf"].as_i64().unwrap(), iat);
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 15 * 60);
    for id in ["jti", "sid"] {
        assert!(
            uuid::Uuid::parse_str(claims[id].as_str().unwrap()).is_ok(),
            "{id}"
        );
    }
}

/// Verifies an EdDSA JWT with ed25519-dalek: not the library the service
/// signs with.
fn verify_ed25519(token: &str, key: &ed25519_dalek::VerifyingKey) -> bool {
    use ed25519_dalek::Verifier;
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let Ok(sig) = ed25519_dalek::Signature::from_slice(&sig) else {
        return false;
    };
    key.verify(signed.as_bytes(), &sig).is_ok()
}

/// `GET path` over HTTP/1.1 on a raw socket: (status line, headers, body).
pub(crate) fn http1_get(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: identity\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_owned(), headers.to_lowercase(), body.to_owned())
}

/// `GET path` over h2c (HTTP/2 with prior knowledge).
async fn h2c_get(addr: std::net::SocketAddr, path: &str) -> (u16, http::HeaderMap, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    (status, headers, bytes)
}

#[tokio::test]
async fn tokens_verify_offline_with_the_key_from_each_publication_path() {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("carol").await;
    let token = tokens.access_token;
    let (header, _) = parts(&token);
    let kid = header["kid"].as_str().unwrap().to_owned();

    // 1. GetPublicKeys.
    let keys = app
        .anon
        .auth
        .clone()
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert_eq!(keys.keys[0].key_id, kid);
    assert_eq!(keys.keys[0].algorithm, "EdDSA");
    let key = ed25519_dalek::VerifyingKey::from_public_key_pem(&keys.keys[0].pem).unwrap();
    assert!(verify_ed25519(&token, &key));

    // 2. GET /pub-key over HTTP/1.1.
    let addr = app.addr;
    let (status, headers, pem) = tokio::task::spawn_blocking(move || http1_get(addr, "/pub-key"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("cache-control: public, max-age="));
    let key = ed25519_dalek::VerifyingKey::from_public_key_pem(&pem).unwrap();
    assert!(verify_ed25519(&token, &key));

    // 3. GET /.well-known/jwks.json over h2c.
    let (status, headers, body) = h2c_get(app.addr, "/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().unwrap().contains("json"));
    let jwks: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        jwks,
        serde_json::from_str::<Value>(&keys.jwks_json).unwrap()
    );
    let jwk = &jwks["keys"][0];
    assert_eq!(
        (
            jwk["kty"].as_str(),
            jwk["crv"].as_str(),
            jwk["kid"].as_str()
        ),
        (Some("OKP"), Some("Ed25519"), Some(kid.as_str()))
    );
    assert_eq!(
        (jwk["alg"].as_str(), jwk["use"].as_str()),
        (Some("EdDSA"), Some("sig"))
    );
    let x: [u8; 32] = URL_SAFE_NO_PAD
        .decode(jwk["x"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
    assert!(verify_ed25519(&token, &key));

    // The kid is the RFC 7638 thumbprint of the key.
    use sha2::Digest;
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        jwk["x"].as_str().unwrap()
    );
    assert_eq!(
        URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes())),
        kid
    );

    // A tampered token fails the independent check too.
    let (h, p, s) = {
        let mut it = token.split('.');
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    let mut payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
    payload["is_superuser"] = json!(true);
    let forged = format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode(payload.to_string()));
    assert!(!verify_ed25519(&forged, &key));
}

#[tokio::test]
async fn private_key_files_are_readable_by_the_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app().await;
    let mut files = crate::helpers::pem_files(&app.keys_dir.0);
    assert_eq!(files.len(), 1);
    // The MFA key (sealing TOTP secrets) as well.
    files.push(app.keys_dir.0.join("mfa.key"));
    for file in files {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file:?}");
    }
}

#[tokio::test]
async fn an_unknown_login_a_wrong_password_and_an_inactive_user_answer_alike() {
    let app = spawn_app().await;
    app.create_user("dave").await;
    let mut inactive = TestUser::named("erin").request();
    inactive.is_active = Some(false);
    app.users.clone().create_user(inactive).await.unwrap();

    let mut answers = Vec::new();
    for (login, password) in [
        ("dave", "wrong password!"),
        ("nobody", PASSWORD),
        ("erin", PASSWORD),
    ] {
        let status = app.login(login, password).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        answers.push((status.message().to_owned(), reason(&status)));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}

#[tokio::test]
async fn verify_token_answers_from_the_database_not_the_claims() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("frank").await;
    let (_, claims) = parts(&tokens.access_token);

    app.update_user(&user.id, &["first_name", "is_verified"], |u| {
        u.first_name = "Franz".into();
        u.is_verified = true;
    })
    .await
    .unwrap();

    let resp = verify(&app, &tokens.access_token).await.unwrap();
    let fresh = resp.user.unwrap();
    assert_eq!(fresh.first_name, "Franz");
    assert!(
        fresh.is_verified,
        "the claim says false; the answer is current"
    );
    assert!(resp.groups.is_empty());
    let c = resp.claims.unwrap();
    assert_eq!(c.subject, user.id);
    assert_eq!(c.token_id, claims["jti"].as_str().unwrap());
    assert_eq!(c.session_id, claims["sid"].as_str().unwrap());
    assert_eq!(c.issuer, "identity");
    assert_eq!(c.audience, ["identity"]);
    assert_eq!(
        c.issue_time.unwrap().seconds,
        claims["iat"].as_i64().unwrap()
    );
    assert_eq!(
        c.expire_time.unwrap().seconds,
        claims["exp"].as_i64().unwrap()
    );
}

/// Signs `claims` with the server's own private key, under `header`.
fn sign_with_server_key(app: &TestApp, header: &Value, claims: &Value) -> String {
    let path = crate::helpers::pem_files(&app.keys_dir.0).remove(0);
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(path).unwrap()).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.typ = header["typ"].as_str().map(str::to_owned);
    h.kid = header["kid"].as_str().map(str::to_owned);
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

fn unsigned(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[tokio::test]
async fn forged_and_invalid_tokens_are_refused_everywhere() {
    use hmac::Mac;
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("mallory").await;
    let (header, claims) = parts(&tokens.access_token);
    let now = chrono::Utc::now().timestamp();
    let id = user.id.as_str();

    // Sanity: the genuine token passes, and so does a re-signed copy.
    assert!(verify(&app, &tokens.access_token).await.is_ok());
    assert!(
        verify(&app, &sign_with_server_key(&app, &header, &claims))
            .await
            .is_ok()
    );

    // alg: none.
    let none = unsigned(
        &json!({"alg": "none", "typ": "at+jwt", "kid": header["kid"]}),
        &claims,
        b"",
    );
    assert_refused(&app, &none, id, "TOKEN_MALFORMED").await;

    // HS256 with the public key as the shared secret.
    let pem = app
        .anon
        .auth
        .clone()
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys[0]
        .pem
        .clone();
    let hs_header = json!({"alg": "HS256", "typ": "at+jwt", "kid": header["kid"]});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(hs_header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(pem.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let hs = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    );
    assert_refused(&app, &hs, id, "TOKEN_SIGNATURE").await;

    // An unknown kid.
    let mut h = header.clone();
    h["kid"] = json!("not-a-key-of-ours");
    assert_refused(
        &app,
        &sign_with_server_key(&app, &h, &claims),
        id,
        "TOKEN_SIGNATURE",
    )
    .await;

    // A tampered payload under the original signature.
    let mut c = claims.clone();
    c["is_superuser"] = json!(true);
    let sig = tokens.access_token.rsplit_once('.').unwrap().1;
    let tampered = format!(
        "{}.{}.{sig}",
        tokens.access_token.split('.').next().unwrap(),
        URL_SAFE_NO_PAD.encode(c.to_string())
    );
    assert_refused(&app, &tampered, id, "TOKEN_SIGNATURE").await;

    // Claims, each signed with the real key.
    type Change = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "TOKEN_ISSUER_OR_AUDIENCE",
            Box::new(|c| c["iss"] = json!("someone-else")),
        ),
        (
            "TOKEN_ISSUER_OR_AUDIENCE",
            Box::new(|c| c["aud"] = json!("another-service")),
        ),
        (
            "TOKEN_MALFORMED",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "TOKEN_EXPIRED",
            Box::new(move |c| {
                c["iat"] = json!(now - 3600);
                c["nbf"] = json!(now - 3600);
                c["exp"] = json!(now - 600);
            }),
        ),
        (
            "TOKEN_NOT_YET_VALID",
            Box::new(move |c| {
                c["nbf"] = json!(now + 600);
                c["exp"] = json!(now + 1200);
            }),
        ),
    ];
    for (reason, change) in cases {
        let mut c = claims.clone();
        change(&mut c);
        assert_refused(&app, &sign_with_server_key(&app, &header, &c), id, reason).await;
    }

    // A token that is not an access token (typ).
    let mut h = header.clone();
    h["typ"] = json!("JWT");
    assert_refused(
        &app,
        &sign_with_server_key(&app, &h, &claims),
        id,
        "TOKEN_MALFORMED",
    )
    .await;

    // A token signed by a foreign key with our kid.
    let foreign = {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let pem = sk.to_pkcs8_pem(Default::default()).unwrap();
        let key = jsonwebtoken::EncodingKey::from_ed_pem(pem.as_bytes()).unwrap();
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.typ = Some("at+jwt".into());
        h.kid = header["kid"].as_str().map(str::to_owned);
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    };
    assert_refused(&app, &foreign, id, "TOKEN_SIGNATURE").await;

    // Garbage, and a bearer header that is not one.
    assert_refused(&app, "not.a.jwt", id, "TOKEN_MALFORMED").await;
    let status = verify(&app, "").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn tokens_of_deleted_deactivated_or_password_changed_users_are_refused() {
    let app = spawn_app().await;

    let (gone, t) = app.signed_in_user("gone").await;
    app.users
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: gone.id.clone(),
        })
        .await
        .unwrap();
    assert_refused(&app, &t.access_token, &gone.id, "USER_NOT_FOUND").await;

    let (idle, t) = app.signed_in_user("idle").await;
    app.update_user(&idle.id, &["is_active"], |u| u.is_active = false)
        .await
        .unwrap();
    assert_refused(&app, &t.access_token, &idle.id, "USER_INACTIVE").await;
    assert_eq!(
        refresh(&app, &t.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let (reset, t) = app.signed_in_user("resetme").await;
    app.users
        .clone()
        .set_password(pb::SetPasswordRequest {
            id: reset.id.clone(),
            new_password: "a new password 1".into(),
        })
        .await
        .unwrap();
    // SetPassword ends every session.
    assert_refused(&app, &t.access_token, &reset.id, "SESSION_ENDED").await;
    assert_eq!(
        refresh(&app, &t.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert!(app.login("resetme", PASSWORD).await.is_err());
    assert!(app.login("resetme", "a new password 1").await.is_ok());
}

#[tokio::test]
async fn refresh_rotates_and_keeps_the_session() {
    let app = spawn_app().await;
    let (user, t1) = app.signed_in_user("rita").await;
    let r = refresh(&app, &t1.refresh_token).await.unwrap();
    let t2 = r.tokens.unwrap();
    assert_eq!(r.user.unwrap().id, user.id);
    assert_ne!(t2.refresh_token, t1.refresh_token);
    let (_, c1) = parts(&t1.access_token);
    let (_, c2) = parts(&t2.access_token);
    assert_eq!(c1["sid"], c2["sid"], "same session");
    assert_ne!(c1["jti"], c2["jti"], "new token id");
    assert!(verify(&app, &t2.access_token).await.is_ok());
    // The new refresh token works in turn.
    let t3 = refresh(&app, &t2.refresh_token)
        .await
        .unwrap()
        .tokens
        .unwrap();
    assert!(verify(&app, &t3.access_token).await.is_ok());
}

#[tokio::test]
async fn reusing_a_retired_refresh_token_ends_that_session_only() {
    let app = spawn_app().await;
    let (user, a1) = app.signed_in_user("sam").await;
    let b = app.login("sam", PASSWORD).await.unwrap().tokens.unwrap();
    let a2 = refresh(&app, &a1.refresh_token)
        .await
        .unwrap()
        .tokens
        .unwrap();

    // a1's refresh token is retired: presenting it again is reuse.
    let status = refresh(&app, &a1.refresh_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The whole session A is over: its newest tokens too.
    assert_eq!(
        refresh(&app, &a2.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_refused(&app, &a2.access_token, &user.id, "SESSION_ENDED").await;
    // Session B lives on.
    assert!(verify(&app, &b.access_token).await.is_ok());
    assert!(refresh(&app, &b.refresh_token).await.is_ok());
}

#[tokio::test]
async fn two_concurrent_refreshes_of_one_token_give_exactly_one_pair() {
    let app = spawn_app().await;
    let (_, t) = app.signed_in_user("twin").await;
    let (a, b) = tokio::join!(
        refresh(&app, &t.refresh_token),
        refresh(&app, &t.refresh_token)
    );
    let ok = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{a:?} {b:?}");
    let failed = if a.is_ok() { &b } else { &a };
    assert_eq!(failed.as_ref().unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test]
async fn refresh_rebuilds_claims_from_the_current_user() {
    let app = spawn_app().await;
    let (user, t) = app.signed_in_user("promoted").await;
    app.update_user(&user.id, &["is_superuser"], |u| u.is_superuser = true)
        .await
        .unwrap();
    let t2 = refresh(&app, &t.refresh_token)
        .await
        .unwrap()
        .tokens
        .unwrap();
    assert_eq!(parts(&t2.access_token).1["is_superuser"], true);
}

#[tokio::test]
async fn logout_ends_one_session_or_all_of_them() {
    let app = spawn_app().await;
    let (user, a) = app.signed_in_user("lou").await;
    let b = app.login("lou", PASSWORD).await.unwrap().tokens.unwrap();
    let c = app.login("lou", PASSWORD).await.unwrap().tokens.unwrap();

    app.anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: a.refresh_token.clone(),
            all_sessions: false,
        })
        .await
        .unwrap();
    assert_refused(&app, &a.access_token, &user.id, "SESSION_ENDED").await;
    assert_eq!(
        refresh(&app, &a.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert!(verify(&app, &b.access_token).await.is_ok());

    app.anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: b.refresh_token.clone(),
            all_sessions: true,
        })
        .await
        .unwrap();
    assert_refused(&app, &b.access_token, &user.id, "SESSION_ENDED").await;
    assert_refused(&app, &c.access_token, &user.id, "SESSION_ENDED").await;

    let status = app
        .anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: "never-issued".into(),
            all_sessions: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn change_password_keeps_the_callers_session_and_ends_the_others() {
    let app = spawn_app().await;
    let (user, mine) = app.signed_in_user("cora").await;
    let other = app.login("cora", PASSWORD).await.unwrap().tokens.unwrap();
    let me = app.as_token(&mine.access_token);

    let status = me
        .auth
        .clone()
        .change_password(pb::ChangePasswordRequest {
            current_password: "not my password".into(),
            new_password: "a fresh password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let status = me
        .auth
        .clone()
        .change_password(pb::ChangePasswordRequest {
            current_password: PASSWORD.into(),
            new_password: "short".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    me.auth
        .clone()
        .change_password(pb::ChangePasswordRequest {
            current_password: PASSWORD.into(),
            new_password: "a fresh password".into(),
        })
        .await
        .unwrap();

    // The other session is over.
    assert_refused(&app, &other.access_token, &user.id, "SESSION_ENDED").await;
    assert!(refresh(&app, &other.refresh_token).await.is_err());
    // The caller's access token predates the change; its refresh token works.
    assert_refused(&app, &mine.access_token, &user.id, "CREDENTIALS_CHANGED").await;
    let renewed = refresh(&app, &mine.refresh_token)
        .await
        .unwrap()
        .tokens
        .unwrap();
    assert!(
        get_self(&app, &renewed.access_token, &user.id)
            .await
            .is_ok()
    );
    // The new password logs in, the old one does not.
    assert!(app.login("cora", "a fresh password").await.is_ok());
    assert!(app.login("cora", PASSWORD).await.is_err());

    let status = app
        .anon
        .auth
        .clone()
        .change_password(pb::ChangePasswordRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

pub(crate) async fn failures_of(app: &TestApp, key: &str) -> Option<i32> {
    use diesel::{ExpressionMethods, OptionalExtension, QueryDsl};
    use diesel_async::RunQueryDsl;
    use identity::db::schema::login_failures;
    let mut conn = app.db.connect().await;
    login_failures::table
        .filter(login_failures::key.eq(key))
        .select(login_failures::failures)
        .first(&mut conn)
        .await
        .optional()
        .unwrap()
}

#[tokio::test]
async fn five_failures_throttle_the_account_even_for_the_right_password() {
    let app = spawn_app().await;
    let user = app.create_user("target").await;
    // Username and email share one count.
    for login in ["target", &user.email, "TARGET", &user.email, "target"] {
        let status = app.login(login, "wrong password!").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = app.login("target", PASSWORD).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry = status
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .unwrap();
    assert!(
        retry >= Duration::from_secs(1) && retry <= Duration::from_secs(15 * 60),
        "{retry:?}"
    );
    // A refused attempt is not counted: refusals must not lengthen a lock.
    assert_eq!(
        failures_of(&app, &format!("user:{}", user.id)).await,
        Some(5)
    );

    // An unknown login is throttled exactly like a real one.
    for _ in 0..5 {
        assert_eq!(
            app.login("ghost", "wrong password!")
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        app.login("ghost", "wrong password!")
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    // Both refusals are told apart from the other RESOURCE_EXHAUSTED.
    let body = crate::metrics::scrape(app.addr).await;
    let throttled = r#"identity_resource_exhausted_total{cause="login_throttle"}"#;
    assert_eq!(
        crate::metrics::sample(&body, throttled),
        Some(2.0),
        "{body}"
    );
}

#[tokio::test]
async fn a_successful_login_resets_the_count() {
    let app = spawn_app().await;
    let user = app.create_user("forgetful").await;
    for _ in 0..4 {
        app.login("forgetful", "wrong password!").await.unwrap_err();
    }
    app.login("forgetful", PASSWORD).await.unwrap();
    assert_eq!(failures_of(&app, &format!("user:{}", user.id)).await, None);
    for _ in 0..4 {
        app.login("forgetful", "wrong password!").await.unwrap_err();
    }
    assert!(
        app.login("forgetful", PASSWORD).await.is_ok(),
        "4 + 4 is not 5 in a row"
    );
}

#[tokio::test]
async fn parallel_attempts_are_counted_one_at_a_time_and_only_five_reach_the_password_check() {
    let app = spawn_app().await;
    let user = app.create_user("hammered").await;
    let calls = (0..100).map(|_| app.login("hammered", "wrong password!"));
    let results = futures::future::join_all(calls).await;
    // Attempts are counted before the password check, one at a time: the
    // first five are checked (and fail), the rest meet the lock.
    let failed = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|s| s.code() == Code::Unauthenticated))
        .count();
    let throttled = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .count();
    assert_eq!((failed, throttled), (5, 95));
    assert_eq!(
        failures_of(&app, &format!("user:{}", user.id)).await,
        Some(5)
    );
    // The right password meets the lock too.
    let status = app.login("hammered", PASSWORD).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn a_login_upgrades_a_hash_made_with_weaker_parameters() {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::RunQueryDsl;
    use identity::db::schema::users;
    let app = spawn_app().await;
    let user = app.create_user("legacy").await;
    let id = uuid::Uuid::parse_str(&user.id).unwrap();
    let weak = identity::hashing::Hasher::new(
        identity::hashing::HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        },
        1,
        1,
    )
    .unwrap()
    .hash(
        &identity::domain::Password::parse(PASSWORD, &[], &identity::domain::BreachedList::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    let mut conn = app.db.connect().await;
    diesel::update(users::table.find(id))
        .set(users::password_hash.eq(&weak))
        .execute(&mut conn)
        .await
        .unwrap();

    app.login("legacy", PASSWORD).await.unwrap();
    let now: String = users::table
        .find(id)
        .select(users::password_hash)
        .first(&mut conn)
        .await
        .unwrap();
    assert!(now.starts_with("$argon2id$v=19$m=4096,t=1,p=1$"), "{now}");
    assert!(app.login("legacy", PASSWORD).await.is_ok());
}

#[tokio::test]
async fn es256_and_rs256_keys_sign_verifiable_tokens() {
    use identity::config::JwtAlgorithm;
    for (alg, name, kty) in [
        (JwtAlgorithm::Es256, "ES256", "EC"),
        (JwtAlgorithm::Rs256, "RS256", "RSA"),
    ] {
        let db = crate::helpers::TestDb::migrated().await;
        let app = crate::helpers::spawn_app_on(db, |c| c.jwt_algorithm = alg).await;
        let (user, t) = app.signed_in_user("algo").await;
        let (header, _) = parts(&t.access_token);
        assert_eq!(header["alg"], name);
        assert_eq!(
            verify(&app, &t.access_token)
                .await
                .unwrap()
                .user
                .unwrap()
                .id,
            user.id
        );
        let keys = app
            .anon
            .auth
            .clone()
            .get_public_keys(pb::GetPublicKeysRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(keys.keys[0].algorithm, name);
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&keys.jwks_json).unwrap();
        let jwk = jwks
            .find(header["kid"].as_str().unwrap())
            .expect("kid in the JWKS");
        assert_eq!(serde_json::to_value(jwk).unwrap()["kty"], kty);
        // Offline, with the published JWK only.
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut v = jsonwebtoken::Validation::new(name.parse::<jsonwebtoken::Algorithm>().unwrap());
        v.set_audience(&["identity"]);
        v.set_issuer(&["identity"]);
        assert!(jsonwebtoken::decode::<Value>(&t.access_token, &key, &v).is_ok());
    }
}

#[tokio::test]
async fn a_rotated_key_signs_while_the_old_one_still_verifies() {
    let app = spawn_app().await;
    let (user, old) = app.signed_in_user("rotor").await;
    let old_kid = parts(&old.access_token).0["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    identity::token::keys::generate(&app.keys_dir.0, identity::config::JwtAlgorithm::EdDsa)
        .unwrap();
    let app = app.restart(|_| {}).await;

    let new = app.login("rotor", PASSWORD).await.unwrap().tokens.unwrap();
    let new_kid = parts(&new.access_token).0["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_kid, old_kid);
    assert!(verify(&app, &new.access_token).await.is_ok());
    assert!(
        get_self(&app, &old.access_token, &user.id).await.is_ok(),
        "old tokens still verify"
    );
    let keys = app
        .anon
        .auth
        .clone()
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let kids: Vec<_> = keys.keys.iter().map(|k| k.key_id.clone()).collect();
    assert_eq!(kids, [new_kid, old_kid], "the signing key first");
}

#[tokio::test]
async fn old_sessions_and_idle_throttling_rows_are_purged() {
    use diesel_async::SimpleAsyncConnection;
    use identity::db::{sessions::purge_sessions, throttle::purge as purge_failures};
    let app = spawn_app().await;
    let (user, live) = app.signed_in_user("purged").await;
    let (_, ended) = {
        let t = app.login("purged", PASSWORD).await.unwrap().tokens.unwrap();
        (user.clone(), t)
    };
    app.anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: ended.refresh_token.clone(),
            all_sessions: false,
        })
        .await
        .unwrap();
    app.login("purged", "wrong password!").await.unwrap_err();

    let mut conn = app.db.connect().await;
    // Age the ended session and the throttling row.
    conn.batch_execute(
        "UPDATE sessions SET end_time = now() - interval '8 days' WHERE end_time IS NOT NULL; \
         UPDATE login_failures SET update_time = now() - interval '2 days';",
    )
    .await
    .unwrap();
    assert_eq!(
        purge_sessions(&mut conn, chrono::Duration::days(7))
            .await
            .unwrap(),
        1
    );
    assert_eq!(purge_failures(&mut conn).await.unwrap(), 1);
    assert_eq!(
        purge_sessions(&mut conn, chrono::Duration::days(7))
            .await
            .unwrap(),
        0
    );
    // The live session is untouched.
    assert!(verify(&app, &live.access_token).await.is_ok());
    assert!(refresh(&app, &live.refresh_token).await.is_ok());
}

#[tokio::test]
async fn set_password_lifts_a_lock() {
    let app = spawn_app().await;
    let user = app.create_user("locked.out").await;
    for _ in 0..5 {
        app.login("locked.out", "wrong password!")
            .await
            .unwrap_err();
    }
    assert_eq!(
        app.login("locked.out", PASSWORD).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    app.users
        .clone()
        .set_password(pb::SetPasswordRequest {
            id: user.id.clone(),
            new_password: "a new password 2".into(),
        })
        .await
        .unwrap();
    assert!(app.login("locked.out", "a new password 2").await.is_ok());
}

#[tokio::test]
async fn a_new_key_is_published_at_once_but_signs_only_after_the_activation_delay() {
    let app = spawn_app().await;
    // The current key is old: its file name carries its time.
    let current = crate::helpers::pem_files(&app.keys_dir.0).remove(0);
    std::fs::rename(
        &current,
        app.keys_dir.0.join("20200101T000000.000000Z-eddsa.pem"),
    )
    .unwrap();
    let app = app.restart(|_| {}).await;
    let (_, before) = app.signed_in_user("staged").await;
    let old_kid = parts(&before.access_token).0["kid"]
        .as_str()
        .unwrap()
        .to_owned();

    identity::token::keys::generate(&app.keys_dir.0, identity::config::JwtAlgorithm::EdDsa)
        .unwrap();
    let app = app
        .restart(|c| c.keys_activation_delay = Duration::from_secs(3600))
        .await;
    let keys = app
        .anon
        .auth
        .clone()
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 2, "the new key is published at once");
    assert_eq!(keys.keys[0].key_id, old_kid, "the old key still signs");
    let during = app.login("staged", PASSWORD).await.unwrap().tokens.unwrap();
    assert_eq!(parts(&during.access_token).0["kid"], old_kid);

    let app = app
        .restart(|c| c.keys_activation_delay = Duration::ZERO)
        .await;
    let after = app.login("staged", PASSWORD).await.unwrap().tokens.unwrap();
    assert_ne!(
        parts(&after.access_token).0["kid"],
        old_kid,
        "once ripe, the new key signs"
    );
    assert!(verify(&app, &during.access_token).await.is_ok());
}

/// OpenID Connect discovery: the issuer, the JWKS on the host the client
/// asked for, the algorithms; and the keys found through it verify a token,
/// as an OIDC library would use them (over HTTP/1.1 and h2c).
#[tokio::test]
async fn the_discovery_document_leads_a_verifier_to_the_keys_by_the_issuer_alone() {
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("olive").await;
    let addr = app.addr;
    let (status, headers, body) =
        tokio::task::spawn_blocking(move || http1_get(addr, "/.well-known/openid-configuration"))
            .await
            .unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("application/json"));
    assert!(headers.contains("cache-control: public, max-age="));
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issuer"], "identity");
    // http1_get sends "Host: identity".
    assert_eq!(doc["jwks_uri"], "http://identity/.well-known/jwks.json");
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        json!(["EdDSA"])
    );
    assert_eq!(doc["subject_types_supported"], json!(["public"]));

    // Over h2c the host is the request's authority: follow jwks_uri.
    let (status, _, body) = h2c_get(app.addr, "/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_slice(&body).unwrap();
    let jwks_uri = doc["jwks_uri"].as_str().unwrap();
    let path = jwks_uri
        .strip_prefix(&format!("http://{}", app.addr))
        .unwrap_or_else(|| panic!("jwks_uri on another host: {jwks_uri}"));
    let (_, _, jwks) = h2c_get(app.addr, path).await;
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&jwks).unwrap();
    let header = jsonwebtoken::decode_header(&tokens.access_token).unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[doc["issuer"].as_str().unwrap()]);
    validation.set_audience(&["identity"]);
    jsonwebtoken::decode::<Value>(
        &tokens.access_token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )
    .expect("the token verifies with the discovered keys");
}
