//! The second factor (issue #18): enrolment, login with a code or a
//! recovery code, replay and throttling, turning it off, a superuser's
//! reset, the assurance (`amr`, `acr`) in tokens, VerifyToken and the
//! Envoy check, and REQUIRE_MFA_FOR_SUPERUSERS. Codes are computed here
//! with RustCrypto's HMAC-SHA-1, independently of the service's TOTP code.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use tonic::Code;

use crate::helpers::{TestApp, TestDb, TestUser, reason, spawn_app, spawn_app_on};
use identity::proto::identity::v1 as pb;

/// RFC 4648 base32 (no padding), as the otpauth URI carries the secret.
pub(crate) fn base32_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bits = 0u64;
    let mut count = 0;
    let mut out = Vec::new();
    for c in s.trim_end_matches('=').bytes() {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c.to_ascii_uppercase())
            .expect("a base32 character") as u64;
        bits = (bits << 5) | v;
        count += 5;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

/// RFC 6238: HMAC-SHA-1 of the 30-second step, dynamic truncation, 6
/// digits.
pub(crate) fn totp(secret_base32: &str, unix: i64) -> String {
    use hmac::{Hmac, Mac};
    let key = base32_decode(secret_base32);
    let step = (unix / 30) as u64;
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&key).unwrap();
    mac.update(&step.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = (h[19] & 0x0f) as usize;
    let n = u32::from_be_bytes([
        h[offset] & 0x7f,
        h[offset + 1],
        h[offset + 2],
        h[offset + 3],
    ]);
    format!("{:06}", n % 1_000_000)
}

#[test]
fn the_tests_own_totp_meets_rfc_6238s_vectors() {
    // Appendix B, SHA-1, secret "12345678901234567890".
    let secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
    for (t, code) in [
        (59, "287082"),
        (1111111109, "081804"),
        (1111111111, "050471"),
        (1234567890, "005924"),
        (2000000000, "279037"),
        (20000000000, "353130"),
    ] {
        assert_eq!(totp(secret, t), code, "t={t}");
    }
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims of a JWT, unverified (the service's own tests verify them).
fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A user with TOTP on: its tokens (from before), its base32 secret, its
/// recovery codes, and the step its confirmation used.
struct Enrolled {
    user: pb::User,
    password: String,
    secret: String,
    recovery: Vec<String>,
}

async fn enrolled(app: &TestApp, username: &str) -> Enrolled {
    let (user, tokens) = app.signed_in_user(username).await;
    let mut auth = app.as_token(&tokens.access_token).auth;
    let begun = auth
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {})
        .await
        .unwrap()
        .into_inner();
    let recovery = auth
        .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
            code: totp(&begun.secret_base32, now()),
        })
        .await
        .unwrap()
        .into_inner()
        .recovery_codes;
    Enrolled {
        user,
        password: TestUser::named(username).password,
        secret: begun.secret_base32,
        recovery,
    }
}

async fn challenge(app: &TestApp, e: &Enrolled) -> String {
    let login = app.login(&e.user.username, &e.password).await.unwrap();
    assert!(login.mfa_required);
    assert!(login.tokens.is_none() && login.user.is_none(), "{login:?}");
    assert!(!login.mfa_challenge.is_empty());
    login.mfa_challenge
}

/// Logs `e` in with its password and the code of the next step: a
/// session proved by both factors.
async fn signed_in_with_totp(app: &TestApp, e: &Enrolled) -> pb::Tokens {
    complete(
        app,
        &challenge(app, e).await,
        &totp(&e.secret, now() + 30),
        "",
    )
    .await
    .unwrap()
    .tokens
    .unwrap()
}

async fn complete(
    app: &TestApp,
    challenge: &str,
    code: &str,
    recovery_code: &str,
) -> Result<pb::CompleteLoginResponse, tonic::Status> {
    app.anon
        .auth
        .clone()
        .complete_login(pb::CompleteLoginRequest {
            mfa_challenge: challenge.into(),
            code: code.into(),
            recovery_code: recovery_code.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn enrolment_shows_the_secret_once_and_needs_a_right_code() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("enrolling").await;
    let mut auth = app.as_token(&tokens.access_token).auth;
    let begun = auth
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {})
        .await
        .unwrap()
        .into_inner();
    let uri = &begun.otpauth_uri;
    assert!(
        uri.starts_with("otpauth://totp/identity:enrolling?"),
        "{uri}"
    );
    for part in [
        format!("secret={}", begun.secret_base32),
        "issuer=identity".into(),
        "algorithm=SHA1".into(),
        "digits=6".into(),
        "period=30".into(),
    ] {
        assert!(uri.contains(&part), "{part} in {uri}");
    }
    assert_eq!(base32_decode(&begun.secret_base32).len(), 20, "160 bits");
    let expire = begun.expire_time.unwrap().seconds;
    assert!((expire - now() - 600).abs() <= 5, "ten minutes");

    // Nothing is on until a right code.
    let login = app
        .login("enrolling", &TestUser::named("enrolling").password)
        .await
        .unwrap();
    assert!(!login.mfa_required && login.tokens.is_some());
    let wrong = auth
        .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
            code: "000000".into(),
        })
        .await
        .unwrap_err();
    // (a one-in-a-million chance that 000000 is right: then this fails)
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(reason(&wrong), "MFA_CODE_INVALID");
    let empty = auth
        .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
            code: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    let recovery = auth
        .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
            code: totp(&begun.secret_base32, now()),
        })
        .await
        .unwrap()
        .into_inner()
        .recovery_codes;
    assert_eq!(recovery.len(), 10);
    let distinct: std::collections::HashSet<_> = recovery.iter().collect();
    assert_eq!(distinct.len(), 10);

    // On now: a second Begin is refused, and nothing shows the secret again.
    let again = auth
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {})
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(reason(&again), "MFA_ALREADY_ENABLED");
    let got = app
        .as_token(&tokens.access_token)
        .users
        .get_user(pb::GetUserRequest {
            lookup: Some(pb::get_user_request::Lookup::Id(user.id.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{got:?}").contains(&begun.secret_base32));

    // The change feed says so.
    let changes = app
        .admin
        .changes
        .clone()
        .list_changes(pb::ListChangesRequest {
            user_id: user.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert!(
        changes
            .iter()
            .any(|c| c.kind == pb::ChangeKind::MfaEnabled as i32 && c.user_id == user.id),
        "{changes:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn login_asks_for_the_second_factor_and_the_tokens_say_how_it_was_proved() {
    let app = spawn_app().await;
    let e = enrolled(&app, "two-factor").await;
    // A wrong password is refused as always, with no challenge.
    let wrong = app
        .login("two-factor", "not the password at all")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);

    let challenge = challenge(&app, &e).await;
    // The confirmation used the current step: the next one logs in.
    let code = totp(&e.secret, now() + 30);
    let done = complete(&app, &challenge, &code, "").await.unwrap();
    let tokens = done.tokens.unwrap();
    assert_eq!(done.user.unwrap().id, e.user.id);
    let c = claims(&tokens.access_token);
    assert_eq!(c["amr"], serde_json::json!(["pwd", "otp"]));
    assert_eq!(c["acr"], "aal2");

    // VerifyToken and a refresh keep it.
    let verified = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: tokens.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .claims
        .unwrap();
    assert_eq!(verified.amr, ["pwd", "otp"]);
    assert_eq!(verified.acr, "aal2");
    let refreshed = app
        .anon
        .auth
        .clone()
        .refresh(pb::RefreshRequest {
            refresh_token: tokens.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let c = claims(&refreshed.tokens.unwrap().access_token);
    assert_eq!(c["amr"], serde_json::json!(["pwd", "otp"]));

    // The challenge is spent; the code was used: both refused.
    let spent = complete(&app, &challenge, &code, "").await.unwrap_err();
    assert_eq!(spent.code(), Code::Unauthenticated);
    assert_eq!(reason(&spent), "MFA_CHALLENGE_INVALID");
    let replay = complete(&app, &challenge_of(&app, &e).await, &code, "")
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated);
    assert_eq!(reason(&replay), "MFA_CODE_REUSED");
    // An older code than the last used: refused too.
    let older = complete(
        &app,
        &challenge_of(&app, &e).await,
        &totp(&e.secret, now() - 30),
        "",
    )
    .await
    .unwrap_err();
    assert!(
        ["MFA_CODE_REUSED", "MFA_CODE_INVALID"].contains(&reason(&older).as_str()),
        "{older:?}"
    );
    // A challenge nobody was given.
    let unknown = complete(&app, "not-a-challenge", &code, "")
        .await
        .unwrap_err();
    assert_eq!(reason(&unknown), "MFA_CHALLENGE_INVALID");

    // A plain user's login is unchanged: pwd alone.
    let (_, plain) = app.signed_in_user("one-factor").await;
    let c = claims(&plain.access_token);
    assert_eq!(c["amr"], serde_json::json!(["pwd"]));
    assert_eq!(c["acr"], "aal1");
    app.stop().await;
}

async fn challenge_of(app: &TestApp, e: &Enrolled) -> String {
    challenge(app, e).await
}

#[tokio::test]
async fn a_recovery_code_works_once_and_an_expired_challenge_never() {
    let app = spawn_app().await;
    let e = enrolled(&app, "recovering").await;
    let code = e.recovery[3].clone();
    let done = complete(&app, &challenge(&app, &e).await, "", &code)
        .await
        .unwrap();
    let c = claims(&done.tokens.unwrap().access_token);
    assert_eq!(c["amr"], serde_json::json!(["pwd", "rcode"]));
    assert_eq!(c["acr"], "aal2");
    // Case and dashes do not matter; a second use does.
    let again = complete(&app, &challenge(&app, &e).await, "", &code.to_uppercase())
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Unauthenticated);
    assert_eq!(reason(&again), "MFA_CODE_INVALID");
    let other = complete(
        &app,
        &challenge(&app, &e).await,
        "",
        &e.recovery[4].replace('-', "").to_uppercase(),
    )
    .await;
    assert!(other.is_ok(), "{other:?}");

    // Both at once, or neither: INVALID_ARGUMENT.
    let both = complete(&app, "x", "123456", &e.recovery[5])
        .await
        .unwrap_err();
    assert_eq!(both.code(), Code::InvalidArgument);
    let neither = complete(&app, "x", "", "").await.unwrap_err();
    assert_eq!(neither.code(), Code::InvalidArgument);

    // A challenge past its five minutes (aged in the database).
    let old = challenge(&app, &e).await;
    {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = app.db.connect().await;
        conn.batch_execute("UPDATE mfa_challenges SET expire_time = now() - interval '1 second'")
            .await
            .unwrap();
    }
    let expired = complete(&app, &old, &totp(&e.secret, now() + 30), "")
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert_eq!(reason(&expired), "MFA_CHALLENGE_INVALID");
    app.stop().await;
}

#[tokio::test]
async fn wrong_codes_count_towards_the_login_throttle() {
    let app = spawn_app().await;
    let e = enrolled(&app, "guessed").await;
    let right = totp(&e.secret, now() + 30);
    // Codes that are not the right one (nor the confirmation's).
    let wrong = |i: u32| format!("{:06}", (right.parse::<u32>().unwrap() + 1 + i) % 1_000_000);
    let mut refusals = Vec::new();
    let first = challenge(&app, &e).await;
    for i in 0..3 {
        refusals.push(
            complete(&app, &first, &wrong(i), "")
                .await
                .unwrap_err()
                .code(),
        );
    }
    // A right password in between clears nothing: the guesser who knows it
    // gets no fresh guesses at the code.
    let second = challenge(&app, &e).await;
    for i in 3..6 {
        refusals.push(
            complete(&app, &second, &wrong(i), "")
                .await
                .unwrap_err()
                .code(),
        );
    }
    assert_eq!(refusals[..5], [Code::Unauthenticated; 5], "{refusals:?}");
    assert_eq!(refusals[5], Code::ResourceExhausted, "{refusals:?}");
    // The password login is locked as well: the same key.
    let locked = app.login("guessed", &e.password).await.unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted);
    app.stop().await;
}

#[tokio::test]
async fn totp_is_turned_off_by_its_user_or_reset_by_a_superuser() {
    let app = spawn_app().await;
    let e = enrolled(&app, "leaving").await;
    let tokens = signed_in_with_totp(&app, &e).await;
    let mut auth = app.as_token(&tokens.access_token).auth;
    let wrong = auth
        .disable_totp(pb::DisableTotpRequest {
            current_password: "not my password at all".into(),
            code: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let neither = auth
        .disable_totp(pb::DisableTotpRequest::default())
        .await
        .unwrap_err();
    assert_eq!(neither.code(), Code::InvalidArgument);
    auth.disable_totp(pb::DisableTotpRequest {
        current_password: e.password.clone(),
        code: String::new(),
    })
    .await
    .unwrap();
    let login = app.login("leaving", &e.password).await.unwrap();
    assert!(
        !login.mfa_required && login.tokens.is_some(),
        "off: one factor again"
    );
    let off = auth
        .disable_totp(pb::DisableTotpRequest {
            current_password: e.password.clone(),
            code: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&off), "MFA_NOT_ENABLED");

    // Or with a current code instead of the password.
    let coded = enrolled(&app, "leaving-by-code").await;
    let tokens = complete(&app, &challenge(&app, &coded).await, "", &coded.recovery[0])
        .await
        .unwrap()
        .tokens
        .unwrap();
    let mut auth = app.as_token(&tokens.access_token).auth;
    let wrong = auth
        .disable_totp(pb::DisableTotpRequest {
            current_password: String::new(),
            code: format!(
                "{:06}",
                (totp(&coded.secret, now() + 30).parse::<u32>().unwrap() + 1) % 1_000_000
            ),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&wrong), "MFA_CODE_INVALID");
    auth.disable_totp(pb::DisableTotpRequest {
        current_password: String::new(),
        code: totp(&coded.secret, now() + 30),
    })
    .await
    .unwrap();
    let login = app.login("leaving-by-code", &coded.password).await.unwrap();
    assert!(!login.mfa_required && login.tokens.is_some());

    // A superuser's reset, for a user who lost the device.
    let lost = enrolled(&app, "lost-device").await;
    let (_, other) = app.signed_in_user("not-an-admin").await;
    let refused = app
        .as_token(&other.access_token)
        .auth
        .reset_second_factor(pb::ResetSecondFactorRequest {
            user_id: lost.user.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let unknown = app
        .admin
        .auth
        .clone()
        .reset_second_factor(pb::ResetSecondFactorRequest {
            user_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    app.admin
        .auth
        .clone()
        .reset_second_factor(pb::ResetSecondFactorRequest {
            user_id: lost.user.id.clone(),
        })
        .await
        .unwrap();
    let login = app.login("lost-device", &lost.password).await.unwrap();
    assert!(!login.mfa_required && login.tokens.is_some());

    // Both removals are in the feed, the reset with its superuser.
    let changes = app
        .admin
        .changes
        .clone()
        .list_changes(pb::ListChangesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .changes;
    let disabled: Vec<_> = changes
        .iter()
        .filter(|c| c.kind == pb::ChangeKind::MfaDisabled as i32)
        .collect();
    assert_eq!(disabled.len(), 3, "{changes:?}");
    assert!(
        disabled
            .iter()
            .any(|c| c.user_id == e.user.id && c.actor_id == e.user.id)
    );
    assert!(
        disabled
            .iter()
            .any(|c| c.user_id == lost.user.id && c.actor_id == app.root.id)
    );
    app.stop().await;
}

#[tokio::test]
async fn superusers_need_a_second_factor_when_required() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.require_mfa_for_superusers = true).await;
    // Root logged in with a password alone (the harness did).
    let refused = app
        .admin
        .users
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(reason(&refused), "MFA_REQUIRED");
    // Its own record is still its own to read.
    app.admin
        .users
        .clone()
        .get_user(pb::GetUserRequest {
            lookup: Some(pb::get_user_request::Lookup::Id(app.root.id.clone())),
        })
        .await
        .unwrap();
    // An ordinary user is not concerned.
    let (_, plain) = app.signed_in_user("plain").await;
    let _ = plain;

    // Root turns TOTP on and logs in with a code: allowed.
    let mut auth = app.admin.auth.clone();
    let begun = auth
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {})
        .await
        .unwrap()
        .into_inner();
    auth.confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
        code: totp(&begun.secret_base32, now()),
    })
    .await
    .unwrap();
    let login = app
        .login(&app.root.username, crate::helpers::ROOT_PASSWORD)
        .await
        .unwrap();
    assert!(login.mfa_required);
    let tokens = complete(
        &app,
        &login.mfa_challenge,
        &totp(&begun.secret_base32, now() + 30),
        "",
    )
    .await
    .unwrap()
    .tokens
    .unwrap();
    app.as_token(&tokens.access_token)
        .users
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap();
    app.stop().await;
}

/// A new API key of `user_id`, made by root: its secret.
async fn api_key_of(app: &TestApp, user_id: &str) -> String {
    app.admin
        .keys
        .clone()
        .create_api_key(pb::CreateApiKeyRequest {
            user_id: user_id.into(),
            display_name: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

#[tokio::test]
async fn api_keys_and_service_accounts_cannot_enrol() {
    let app = spawn_app().await;
    let service = app
        .users
        .clone()
        .create_user(pb::CreateUserRequest {
            username: "a-service".into(),
            email: "a-service@example.com".into(),
            is_service: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let key = api_key_of(&app, &service.id).await;
    let refused = app
        .as_token(&key)
        .auth
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "SERVICE_ACCOUNT");
    // A person's API key is not a session either.
    let (person, _) = app.signed_in_user("keyholder").await;
    let key = api_key_of(&app, &person.id).await;
    let refused = app
        .as_token(&key)
        .auth
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // An API key's token carries no amr.
    let verified = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest { access_token: key })
        .await
        .unwrap()
        .into_inner()
        .claims
        .unwrap();
    assert!(verified.amr.is_empty() && verified.acr.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_mfa_key_rotates_and_secrets_are_sealed_again_when_used() {
    let app = spawn_app().await;
    let used = enrolled(&app, "rotating-user").await;
    let idle = enrolled(&app, "idle-user").await;
    let old_key = app.keys_dir.0.join("mfa.key");
    let new_key = app.keys_dir.0.join("mfa-2.key");
    {
        use std::os::unix::fs::PermissionsExt;
        let bytes: Vec<u8> = (0..32).map(|_| rand_byte()).collect();
        std::fs::write(&new_key, bytes).unwrap();
        std::fs::set_permissions(&new_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // The new key seals; the old one still opens.
    let (new, old) = (new_key.clone(), old_key.clone());
    let app = app
        .restart(move |c| {
            c.mfa_key_file = Some(new);
            c.mfa_previous_key_files = vec![old];
        })
        .await;
    let done = complete(
        &app,
        &challenge(&app, &used).await,
        &totp(&used.secret, now() + 30),
        "",
    )
    .await;
    assert!(done.is_ok(), "{done:?}");
    // The old key gone: the secret used since opens (a wrong code is just
    // wrong), the idle one's does not (an error of the operator's: its
    // user needs ResetSecondFactor).
    let new = new_key.clone();
    let app = app.restart(move |c| c.mfa_key_file = Some(new)).await;
    let wrong = complete(&app, &challenge(&app, &used).await, "000000", "")
        .await
        .unwrap_err();
    assert_eq!(reason(&wrong), "MFA_CODE_INVALID", "{wrong:?}");
    let lost = complete(&app, &challenge(&app, &idle).await, "000000", "")
        .await
        .unwrap_err();
    assert_eq!(lost.code(), Code::Internal, "{lost:?}");
    app.stop().await;
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(std::time::Instant::now()) & 0xff) as u8
}

#[test]
fn a_bad_mfa_key_file_is_a_bad_setting() {
    let dir = crate::helpers::TempDir::new("identity-mfa-key");
    let short = dir.0.join("short.key");
    std::fs::write(&short, [7u8; 31]).unwrap();
    let out = crate::cli::identity(
        &["serve"],
        &[
            ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
            ("KEYS_DIR", dir.0.to_str().unwrap()),
            ("MFA_KEY_FILE", short.to_str().unwrap()),
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("identity: "))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(
        said[0].contains("MFA_KEY_FILE") && said[0].contains("32"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_envoy_check_says_how_the_session_was_proved_and_may_require_a_second_factor() {
    use crate::envoy::{allowed, check, denied, request};
    let app = spawn_app().await;
    let e = enrolled(&app, "mesh-user").await;
    let strong = signed_in_with_totp(&app, &e).await;
    let (_, weak) = app.signed_in_user("password-only").await;
    let as_token = |token: &str, extensions: &[(&str, &str)]| {
        request(&[("authorization", &format!("Bearer {token}"))], extensions)
    };

    // x-identity-amr, comma-separated; a forged one is overwritten.
    let mut forged = as_token(&weak.access_token, &[]);
    if let Some(http) = forged
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.headers
            .insert("x-identity-amr".into(), "pwd,otp".into());
    }
    let (set, _) = allowed(&check(&app, forged).await.unwrap());
    assert_eq!(set["x-identity-amr"], "pwd");
    let (set, _) = allowed(
        &check(&app, as_token(&strong.access_token, &[]))
            .await
            .unwrap(),
    );
    assert_eq!(set["x-identity-amr"], "pwd,otp");

    // require_mfa: 403 MFA_REQUIRED without a second factor, through with.
    let mfa = [("require_mfa", "true")];
    let (grpc, http, headers) = denied(
        &check(&app, as_token(&weak.access_token, &mfa))
            .await
            .unwrap(),
    );
    assert_eq!((grpc, http), (Code::PermissionDenied as i32, 403));
    assert_eq!(headers["x-identity-deny-reason"], "MFA_REQUIRED");
    allowed(
        &check(&app, as_token(&strong.access_token, &mfa))
            .await
            .unwrap(),
    );
    // Read strictly: anything but "false" requires it.
    denied(
        &check(
            &app,
            as_token(&weak.access_token, &[("require_mfa", "yes")]),
        )
        .await
        .unwrap(),
    );
    allowed(
        &check(
            &app,
            as_token(&weak.access_token, &[("require_mfa", "false")]),
        )
        .await
        .unwrap(),
    );
    app.stop().await;
}
