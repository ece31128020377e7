//! Service accounts and API keys (docs/security.md, "Service accounts and API keys"),
//! through the public surface: accounts that cannot log in, the secret shown
//! once, its checksum, each refusal's reason, `allowed_methods`, expiry,
//! revocation on two replicas, ExchangeApiKey verified offline, the CLI.

use std::sync::Arc;
use std::time::Duration;

use identity::proto::identity::v1 as pb;
use tokio::time::Instant;
use tonic::Code;

use crate::envoy::{allowed, check, denied, request};
use crate::helpers::*;

/// A service account made by root.
async fn service_account(app: &TestApp, username: &str) -> pb::User {
    app.admin
        .create_user(pb::CreateUserRequest {
            username: username.into(),
            email: format!("{username}@services.example"),
            is_service: true,
            ..Default::default()
        })
        .await
        .expect("a service account")
}

/// CreateApiKey as `clients`: the key and its secret.
async fn create_key(
    clients: &Clients,
    user_id: &str,
    allowed_methods: &[&str],
) -> Result<(pb::ApiKey, String), tonic::Status> {
    let r = clients
        .keys
        .clone()
        .create_api_key(pb::CreateApiKeyRequest {
            user_id: user_id.into(),
            display_name: "test key".into(),
            expire_time: None,
            allowed_methods: allowed_methods.iter().map(|m| (*m).to_owned()).collect(),
        })
        .await?
        .into_inner();
    Ok((r.api_key.unwrap(), r.secret))
}

async fn verify(app: &TestApp, credential: &str) -> Result<pb::VerifyTokenResponse, tonic::Status> {
    app.anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: credential.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, why: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), why, "{status:?}");
}

/// Verifies `credential` on `app` until `done` holds; fails after `within`.
async fn until(
    app: &TestApp,
    credential: &str,
    within: Duration,
    done: impl Fn(&Result<pb::VerifyTokenResponse, tonic::Status>) -> bool,
) {
    let start = Instant::now();
    loop {
        let answer = verify(app, credential).await;
        if done(&answer) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "still {answer:?} after {within:?}"
        );
        tokio::task::yield_now().await;
    }
}

fn has_reason(
    why: &'static str,
) -> impl Fn(&Result<pb::VerifyTokenResponse, tonic::Status>) -> bool {
    move |r| r.as_ref().is_err_and(|s| reason(s) == why)
}

#[tokio::test]
async fn service_accounts_are_made_by_a_superuser_without_a_password_and_never_log_in() {
    let app = spawn_app().await;
    // Anonymous or a plain user: refused (a flag that is not the default).
    let request = pb::CreateUserRequest {
        username: "mailer".into(),
        email: "mailer@services.example".into(),
        is_service: true,
        ..Default::default()
    };
    let anon = app.anon.create_user(request.clone()).await.unwrap_err();
    assert_eq!(anon.code(), Code::Unauthenticated);
    let (_, tokens) = app.signed_in_user("plain").await;
    let plain = app.as_token(&tokens.access_token);
    let denied_ = plain.create_user(request.clone()).await.unwrap_err();
    assert_eq!(denied_.code(), Code::PermissionDenied);
    // With a password: the field is named.
    let with_password = app
        .admin
        .create_user(pb::CreateUserRequest {
            password: "a long enough secret".into(),
            ..request.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(with_password.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&with_password), ["password"]);

    let svc = service_account(&app, "mailer").await;
    assert!(svc.is_service);
    assert!(
        app.admin
            .get_user(Lookup::Id(&svc.id))
            .await
            .unwrap()
            .is_service
    );

    for password in ["", "anything at all", "!"] {
        refused(
            app.login("mailer", password).await,
            Code::FailedPrecondition,
            "SERVICE_ACCOUNT",
        );
    }
    refused(
        app.admin
            .users
            .clone()
            .set_password(pb::SetPasswordRequest {
                id: svc.id.clone(),
                new_password: "a new long secret".into(),
            })
            .await,
        Code::FailedPrecondition,
        "SERVICE_ACCOUNT",
    );
    refused(
        app.admin
            .accounts
            .clone()
            .request_password_reset(pb::RequestPasswordResetRequest {
                email: svc.email.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "SERVICE_ACCOUNT",
    );
    refused(
        app.admin
            .accounts
            .clone()
            .issue_verification_token(pb::IssueVerificationTokenRequest {
                user_id: svc.id.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "SERVICE_ACCOUNT",
    );
    // With its own key, it cannot change a password it does not have.
    let (_, secret) = create_key(&app.admin, &svc.id, &[]).await.unwrap();
    refused(
        app.as_token(&secret)
            .auth
            .clone()
            .change_password(pb::ChangePasswordRequest {
                current_password: String::new(),
                new_password: "a new long secret".into(),
            })
            .await,
        Code::FailedPrecondition,
        "SERVICE_ACCOUNT",
    );
    // is_service is immutable.
    let changed = app
        .admin
        .update_user(&svc.id, &["is_service"], |u| u.is_service = false)
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::InvalidArgument);

    // Everything else applies: groups, deactivation.
    let group = app.group_with("Mailers", &[&svc]).await;
    let answer = verify(&app, &secret).await.unwrap();
    assert_eq!(answer.groups[0].id, group.id);
    app.deactivate(&svc).await;
    refused(
        verify(&app, &secret).await,
        Code::Unauthenticated,
        "USER_INACTIVE",
    );
}

#[tokio::test]
async fn a_key_is_shown_once_checked_by_its_checksum_and_acts_as_its_user() {
    let app = spawn_app().await;
    let svc = service_account(&app, "billing").await;
    let (key, secret) = create_key(&app.admin, &svc.id, &[]).await.unwrap();
    assert!(secret.starts_with("idk_"), "{secret}");
    assert_eq!(secret.len(), 53);
    assert!(secret.starts_with(&key.prefix) && key.prefix.len() == 12);
    assert_eq!(key.user_id, svc.id);
    assert!(key.revoke_time.is_none() && key.expire_time.is_none());

    // Never again: not in the list, in no form.
    let listed = app
        .admin
        .keys
        .clone()
        .list_api_keys(pb::ListApiKeysRequest {
            user_id: svc.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert_eq!(listed.api_keys[0].id, key.id);
    assert!(!format!("{listed:?}").contains(&secret[12..]));

    // As its user: itself, not what a superuser may.
    let as_key = app.as_token(&secret);
    let me = as_key.get_user(Lookup::Id(&svc.id)).await.unwrap();
    assert_eq!(me.username, "billing");
    let listing = as_key
        .users
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(listing.code(), Code::PermissionDenied);
    // VerifyToken of a key: the user and groups; the key's id, no session.
    let answer = verify(&app, &secret).await.unwrap();
    assert_eq!(answer.user.unwrap().id, svc.id);
    let claims = answer.claims.unwrap();
    assert_eq!(claims.token_id, key.id);
    assert_eq!(claims.session_id, "");

    // One character changed: the checksum tells, no lookup needed.
    let mut typo = secret.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    refused(
        verify(&app, &typo).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    refused(
        app.as_token(&typo).get_user(Lookup::Id(&svc.id)).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    // Well made, never issued.
    let stranger = identity::token::apikey::generate().unwrap().secret;
    refused(
        verify(&app, &stranger).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    refused(
        verify(&app, "idk_short").await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );

    // Its last use is noted (at most once a minute, off the call's path).
    let start = Instant::now();
    loop {
        let keys = app
            .admin
            .keys
            .clone()
            .list_api_keys(pb::ListApiKeysRequest {
                user_id: svc.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .api_keys;
        if keys[0].last_use_time.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no last use noted"
        );
        tokio::task::yield_now().await;
    }

    // People have keys too: a user makes its own, not another's.
    let (other, tokens) = app.signed_in_user("person").await;
    let person = app.as_token(&tokens.access_token);
    let (own, own_secret) = create_key(&person, "", &[]).await.unwrap();
    assert_eq!(own.user_id, other.id);
    assert_eq!(
        app.as_token(&own_secret)
            .get_user(Lookup::Id(&other.id))
            .await
            .unwrap()
            .id,
        other.id
    );
    let theirs = create_key(&person, &svc.id, &[]).await.unwrap_err();
    assert_eq!(theirs.code(), Code::PermissionDenied);
    let list = person
        .keys
        .clone()
        .list_api_keys(pb::ListApiKeysRequest {
            user_id: svc.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(list.code(), Code::PermissionDenied);
    // Its user revokes its own key.
    person
        .keys
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: own.id })
        .await
        .unwrap();
    refused(
        verify(&app, &own_secret).await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );
}

#[tokio::test]
async fn allowed_methods_limit_a_key_everywhere_it_is_checked() {
    let app = spawn_app().await;
    let svc = service_account(&app, "mailer").await;
    // The mail service's key: the two account RPCs. Its user is a
    // superuser, as those RPCs need.
    app.admin
        .update_user(&svc.id, &["is_superuser"], |u| u.is_superuser = true)
        .await
        .unwrap();
    let reset = "/identity.v1.AccountService/RequestPasswordReset";
    let verification = "/identity.v1.AccountService/IssueVerificationToken";
    let (key, secret) = create_key(&app.admin, &svc.id, &[reset, verification])
        .await
        .unwrap();
    assert_eq!(key.allowed_methods.len(), 2);
    let user = app.create_user("forgetful").await;
    let as_key = app.as_token(&secret);
    as_key
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: user.email.clone(),
        })
        .await
        .expect("an allowed method");
    let other = as_key.get_user(Lookup::Id(&user.id)).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let delete = as_key
        .users
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: user.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(delete.code(), Code::PermissionDenied);
    // It cannot make itself a wider key, nor be exchanged for a token.
    assert_eq!(
        create_key(&as_key, "", &[]).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    refused(
        app.anon
            .auth
            .clone()
            .exchange_api_key(pb::ExchangeApiKeyRequest {
                api_key: secret.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "API_KEY_RESTRICTED",
    );
    // Names are checked: identity's own must exist, others must be shaped
    // like a method.
    for bad in ["/identity.v1.UserService/NoSuchRpc", "GetUser", "/a b/c"] {
        let e = create_key(&app.admin, &svc.id, &[bad]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(violated_fields(&e), ["allowed_methods"], "{bad}");
    }

    // The Envoy check holds the proxied path to the same list.
    let (_, mesh_secret) = create_key(&app.admin, &svc.id, &["/orders.v1.Orders/Get"])
        .await
        .unwrap();
    let credential = format!("Bearer {mesh_secret}");
    let mut r = request(&[("authorization", &credential)], &[]);
    let path = |r: &mut envoy_types::pb::envoy::service::auth::v3::CheckRequest, p: &str| {
        r.attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap()
            .path = p.to_owned();
    };
    path(&mut r, "/orders.v1.Orders/Get");
    let (set, _) = allowed(&check(&app, r.clone()).await.unwrap());
    assert_eq!(set["x-identity-user-id"], svc.id);
    assert_eq!(set["x-identity-session-id"], "");
    path(&mut r, "/orders.v1.Orders/Delete");
    let (code, http, headers) = denied(&check(&app, r).await.unwrap());
    assert_eq!((code, http), (Code::PermissionDenied as i32, 403));
    assert_eq!(headers["x-identity-deny-reason"], "METHOD_NOT_ALLOWED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_keys_are_refused_at_once_on_every_replica() {
    let db = Arc::new(TestDb::migrated().await);
    let a = spawn_app_on(db.clone(), |_| {}).await;
    let b = spawn_app_with(db.clone(), a.keys_dir.clone(), |_| {}).await;
    let svc = service_account(&a, "batch").await;

    // An expiry in the past is a mistake; one soon is kept.
    let past = a
        .admin
        .keys
        .clone()
        .create_api_key(pb::CreateApiKeyRequest {
            user_id: svc.id.clone(),
            expire_time: Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() - 60,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&past), ["expire_time"]);
    let soon = chrono::Utc::now() + chrono::Duration::seconds(2);
    let short = a
        .admin
        .keys
        .clone()
        .create_api_key(pb::CreateApiKeyRequest {
            user_id: svc.id.clone(),
            expire_time: Some(prost_types::Timestamp {
                seconds: soon.timestamp(),
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    verify(&a, &short.secret).await.expect("not expired yet");
    // Time passes; the cached key expires with it (no change to wait for).
    until(
        &a,
        &short.secret,
        Duration::from_secs(5),
        has_reason("API_KEY_EXPIRED"),
    )
    .await;

    // Revocation: the writing replica at once, the other within a second.
    let (key, secret) = create_key(&a.admin, &svc.id, &[]).await.unwrap();
    verify(&a, &secret).await.unwrap();
    verify(&b, &secret).await.unwrap();
    verify(&b, &secret).await.unwrap();
    let revoked = a
        .admin
        .keys
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: key.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!(revoked.revoke_time.is_some());
    refused(
        verify(&a, &secret).await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );
    until(
        &b,
        &secret,
        Duration::from_secs(1),
        has_reason("API_KEY_REVOKED"),
    )
    .await;
    refused(
        b.as_token(&secret).get_user(Lookup::Id(&svc.id)).await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );
    // Again: no change, the same time.
    let again = a
        .admin
        .keys
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: key.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(again.revoke_time, revoked.revoke_time);
    // Someone else's key, an unknown one.
    let (_, tokens) = a.signed_in_user("nosy").await;
    let nosy = a.as_token(&tokens.access_token);
    let (other, _) = create_key(&a.admin, &svc.id, &[]).await.unwrap();
    let e = nosy
        .keys
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: other.id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = a
        .admin
        .keys
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // The feed carries both, with the key's id.
    let changes = a
        .admin
        .changes
        .clone()
        .list_changes(pb::ListChangesRequest {
            user_id: svc.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let of_key: Vec<i32> = changes
        .iter()
        .filter(|c| c.api_key_id == key.id)
        .map(|c| c.kind)
        .collect();
    assert_eq!(
        of_key,
        [
            pb::ChangeKind::ApiKeyCreated as i32,
            pb::ChangeKind::ApiKeyRevoked as i32
        ]
    );
}

#[tokio::test]
async fn an_exchanged_token_verifies_offline_and_ends_with_its_key() {
    let app = spawn_app().await;
    let svc = service_account(&app, "reports").await;
    let (key, secret) = create_key(&app.admin, &svc.id, &[]).await.unwrap();
    let exchanged = app
        .anon
        .auth
        .clone()
        .exchange_api_key(pb::ExchangeApiKeyRequest {
            api_key: secret.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exchanged.user.unwrap().id, svc.id);
    let tokens = exchanged.tokens.unwrap();
    assert_eq!(tokens.refresh_token, "");
    assert!(tokens.refresh_token_expire_time.is_none());

    // Offline, with the published keys only.
    let jwks: jsonwebtoken::jwk::JwkSet = {
        let addr = app.addr;
        let body = tokio::task::spawn_blocking(move || {
            crate::auth::http1_get(addr, "/.well-known/jwks.json").2
        })
        .await
        .unwrap();
        serde_json::from_str(&body).unwrap()
    };
    let header = jsonwebtoken::decode_header(&tokens.access_token).unwrap();
    let jwk = jwks
        .find(&header.kid.unwrap())
        .expect("the kid is published");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["identity"]);
    validation.set_issuer(&["identity"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &tokens.access_token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )
    .expect("verifies offline")
    .claims;
    assert_eq!(claims["sub"], svc.id.as_str());

    // Its session names the key, and ends with it.
    verify(&app, &tokens.access_token).await.unwrap();
    let sessions = app
        .admin
        .auth
        .clone()
        .list_sessions(pb::ListSessionsRequest {
            user_id: svc.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].api_key_id, key.id);
    app.admin
        .keys
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: key.id.clone() })
        .await
        .unwrap();
    refused(
        verify(&app, &tokens.access_token).await,
        Code::Unauthenticated,
        "SESSION_ENDED",
    );
    refused(
        app.anon
            .auth
            .clone()
            .exchange_api_key(pb::ExchangeApiKeyRequest { api_key: secret })
            .await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );
    let ended = app
        .admin
        .auth
        .clone()
        .list_sessions(pb::ListSessionsRequest {
            user_id: svc.id.clone(),
            include_ended: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(ended[0].end_reason, "API_KEY_REVOKED");
}

#[tokio::test]
async fn the_command_line_makes_lists_and_revokes_keys() {
    let db = Arc::new(TestDb::migrated().await);
    let app = spawn_app_on(db.clone(), |_| {}).await;
    let svc = service_account(&app, "cron").await;
    let url = db.url.clone();
    let reset = "/identity.v1.AccountService/RequestPasswordReset";
    let out = crate::cli::identity(
        &[
            "apikeys",
            "create",
            "--user",
            "cron",
            "--name",
            "nightly",
            "--allow",
            reset,
            "--expires",
            "90d",
        ],
        &[("DATABASE_URL", &url)],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("idk_") && secret.len() == 53, "{secret}");
    assert!(
        !stderr.contains(&secret[12..]),
        "the secret once, on stdout only"
    );
    // The key works, limited as asked.
    let answer = verify(&app, &secret).await.unwrap();
    assert_eq!(answer.user.unwrap().id, svc.id);

    let out = crate::cli::identity(
        &["apikeys", "list", "--user", &svc.id],
        &[("DATABASE_URL", &url)],
        None,
    );
    assert!(out.status.success());
    let listed = String::from_utf8(out.stdout).unwrap();
    let line = listed.lines().nth(1).expect("one key");
    assert!(line.contains("nightly") && line.contains(reset), "{line}");
    assert!(!listed.contains(&secret[12..]));
    let id = line.split('\t').next().unwrap().to_owned();

    let out = crate::cli::identity(&["apikeys", "revoke", &id], &[("DATABASE_URL", &url)], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // By hand outside the service: within the feed's delivery.
    until(
        &app,
        &secret,
        Duration::from_secs(1),
        has_reason("API_KEY_REVOKED"),
    )
    .await;

    let out = crate::cli::identity(
        &["apikeys", "create", "--user", "nobody"],
        &[("DATABASE_URL", &url)],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
}
