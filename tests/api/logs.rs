//! Nothing secret reaches the logs, at any level and in any encoding: the
//! real binary (and the admin command beside it) at `RUST_LOG=trace`,
//! `debug` and the default, every flow that handles a password, a hash or a
//! token, and a scan of every line for each secret as text, as the byte list
//! `Debug` prints for bytes, as hex and as base64. Colours only on a
//! terminal.

use base64::Engine;

use crate::accounts::{BCRYPT_HASH, BCRYPT_PASSWORD};
use crate::helpers::{AccountServiceClient, AuthServiceClient, Bearer, TempDir, UserServiceClient};
use crate::lifecycle::{Serve, command};
use identity::proto::identity::v1 as pb;

/// How a secret may be spelled in a log line: as itself, as the byte list
/// that `Debug` prints for bytes (`[36, 97, 114, ...]`, also without
/// spaces, and without brackets when it is part of a longer list), as hex
/// (lower and upper case), and as base64 (standard and URL-safe, padded or
/// not, at any of the three alignments it can have inside a longer value:
/// only the characters that its own bytes alone decide).
fn spellings(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let bytes = secret.as_bytes();
    let numbers: Vec<String> = bytes.iter().map(u8::to_string).collect();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut forms = vec![
        secret.to_owned(),
        numbers.join(", "),
        numbers.join(","),
        hex.to_uppercase(),
        hex,
    ];
    for engine in [&STANDARD, &URL_SAFE] {
        for shift in 0..3usize {
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(bytes);
            let text = engine.encode(&shifted);
            // Characters wholly made of the secret's bits.
            let first = (8 * shift).div_ceil(6);
            let last = (8 * (shift + bytes.len())) / 6;
            forms.push(text[first..last].to_owned());
        }
    }
    forms
}

#[test]
fn spellings_cover_the_encodings_a_library_might_print() {
    let forms = spellings("$argon2");
    assert!(forms.contains(&"36, 97, 114, 103, 111, 110, 50".to_owned()));
    assert!(forms.contains(&"36,97,114,103,111,110,50".to_owned()));
    assert!(forms.contains(&"246172676f6e32".to_owned()));
    assert!(forms.contains(&"246172676F6E32".to_owned()));
    let base64 = |text: &str| forms.iter().any(|f| text.contains(f.as_str()));
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    for prefix in ["", "x", "xy", "xyz"] {
        let value = format!("{prefix}$argon2 and more");
        assert!(base64(&STANDARD.encode(&value)), "{prefix:?}");
        assert!(base64(&URL_SAFE_NO_PAD.encode(&value)), "{prefix:?}");
    }
    assert!(!base64(&STANDARD.encode("$argom2")));
}

/// Every line of `lines` against every spelling of every secret.
fn assert_no_secret(lines: &[String], secrets: &[(&str, String)]) {
    for (what, secret) in secrets {
        assert!(secret.len() >= 8, "too short to scan for: {what}");
        for form in spellings(secret) {
            if let Some(line) = lines.iter().find(|l| l.contains(&form)) {
                panic!("{what} ({form}) in the log: {line}");
            }
        }
    }
}

/// Creates the superuser `Root.Admin` with the CLI beside the running
/// service (on its cluster's socket), at the same log level; returns its
/// log lines.
fn create_root(data_dir: &std::path::Path, rust_log: Option<&str>, password: &str) -> Vec<String> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_identity"));
    cmd.args(["createsuperuser", "--username", "Root.Admin"])
        .args(["--email", "Root.Admin@Example.com"])
        .env_remove("DATABASE_URL")
        .env("DATA_DIR", data_dir)
        .env("LOG_FORMAT", "json")
        .env("ARGON2_MEMORY_KIB", "4096")
        .env("ARGON2_ITERATIONS", "1")
        .env("IDENTITY_PASSWORD", password)
        .env_remove("RUST_LOG");
    if let Some(level) = rust_log {
        cmd.env("RUST_LOG", level);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stderr.lines().map(str::to_owned).collect()
}

/// Runs the service at `rust_log` (`None`: RUST_LOG unset, the default),
/// goes through every flow that handles a secret, and scans the log.
async fn no_secret_in_the_log_at(rust_log: Option<&str>) {
    let dir = TempDir::new("identity-logs");
    let data = dir.0.join("data");
    let mut cmd = command(&data);
    cmd.env_remove("RUST_LOG");
    if let Some(level) = rust_log {
        cmd.env("RUST_LOG", level);
    }
    let serve = Serve::start_with(cmd);
    let root_password = "the root secret password";
    let cli_log = create_root(&data, rust_log, root_password);
    let url = format!("http://{}", serve.addr);
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel.clone());
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut accounts = AccountServiceClient::new(channel.clone());

    let (username, email) = ("Logged.User", "Logged.User@Example.com");
    let first = "first secret password";
    let second = "second secret password";
    let third = "third secret password";
    let fourth = "fourth secret password";
    let wrong = "a wrong secret password";
    let user = users
        .create_user(pb::CreateUserRequest {
            username: username.into(),
            email: email.into(),
            password: first.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    auth.login(pb::LoginRequest {
        login: username.into(),
        password: wrong.into(),
    })
    .await
    .unwrap_err();
    let t1 = auth
        .login(pb::LoginRequest {
            login: username.into(),
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
            login: email.to_lowercase(),
            password: first.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let mut as_user =
        AuthServiceClient::with_interceptor(channel.clone(), Bearer::from_token(&t3.access_token));
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

    // As root: account tokens, SetPassword, an import of a bcrypt hash.
    let root = auth
        .login(pb::LoginRequest {
            login: "root.admin".into(),
            password: root_password.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let bearer = Bearer::from_token(&root.access_token);
    let mut as_root = AccountServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let verification = as_root
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    accounts
        .confirm_email(pb::ConfirmEmailRequest {
            token: verification.clone(),
        })
        .await
        .unwrap();
    let reset = as_root
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: email.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    accounts
        .reset_password(pb::ResetPasswordRequest {
            token: reset.clone(),
            new_password: third.into(),
        })
        .await
        .unwrap();
    UserServiceClient::with_interceptor(channel.clone(), bearer.clone())
        .set_password(pb::SetPasswordRequest {
            id: user.id.clone(),
            new_password: fourth.into(),
        })
        .await
        .unwrap();
    // An API key: made, used as a bearer, verified, exchanged, mistyped,
    // revoked.
    let made = identity::proto::identity::v1::api_key_service_client::ApiKeyServiceClient::with_interceptor(
        channel.clone(),
        bearer.clone(),
    )
    .create_api_key(pb::CreateApiKeyRequest {
        user_id: user.id.clone(),
        display_name: "logged key".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    let api_key = made.secret.clone();
    UserServiceClient::with_interceptor(channel.clone(), Bearer::from_token(&api_key))
        .get_user(pb::GetUserRequest {
            lookup: Some(pb::get_user_request::Lookup::Id(user.id.clone())),
        })
        .await
        .unwrap();
    auth.verify_token(pb::VerifyTokenRequest {
        access_token: api_key.clone(),
    })
    .await
    .unwrap();
    let exchanged = auth
        .exchange_api_key(pb::ExchangeApiKeyRequest {
            api_key: api_key.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let mut mistyped = api_key.clone();
    mistyped.replace_range(30..31, if &api_key[30..31] == "a" { "b" } else { "a" });
    auth.verify_token(pb::VerifyTokenRequest {
        access_token: mistyped.clone(),
    })
    .await
    .unwrap_err();
    identity::proto::identity::v1::api_key_service_client::ApiKeyServiceClient::with_interceptor(
        channel.clone(),
        bearer.clone(),
    )
    .revoke_api_key(pb::RevokeApiKeyRequest {
        id: made.api_key.unwrap().id,
    })
    .await
    .unwrap();
    auth.verify_token(pb::VerifyTokenRequest {
        access_token: api_key.clone(),
    })
    .await
    .unwrap_err();
    let (imported, imported_email) = ("Imported.Crypt", "Imported.Crypt@Example.com");
    let results = as_root
        .import_users(pb::ImportUsersRequest {
            users: vec![pb::ImportedUser {
                username: imported.into(),
                email: imported_email.into(),
                password_hash: BCRYPT_HASH.into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].outcome(), pb::import_result::Outcome::Imported);
    // Its first login checks the bcrypt hash and writes an argon2id one.
    let t4 = auth
        .login(pb::LoginRequest {
            login: imported.into(),
            password: BCRYPT_PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();

    // A second factor: enrolment, a login with a code, one with a recovery
    // code (the imported user's).
    use crate::totp::{base32_decode, now, totp};
    let mut as_t4 =
        AuthServiceClient::with_interceptor(channel.clone(), Bearer::from_token(&t4.access_token));
    let begun = as_t4
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {})
        .await
        .unwrap()
        .into_inner();
    let recovery = as_t4
        .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
            code: totp(&begun.secret_base32, now()),
        })
        .await
        .unwrap()
        .into_inner()
        .recovery_codes;
    let mut challenges = Vec::new();
    let mut second_factor_tokens = Vec::new();
    for (code, recovery_code) in [
        (totp(&begun.secret_base32, now() + 30), String::new()),
        (String::new(), recovery[0].clone()),
    ] {
        let challenge = auth
            .login(pb::LoginRequest {
                login: imported.into(),
                password: BCRYPT_PASSWORD.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .mfa_challenge;
        // A wrong code first: its refusal is logged too.
        auth.complete_login(pb::CompleteLoginRequest {
            mfa_challenge: challenge.clone(),
            code: "000000".into(),
            recovery_code: String::new(),
        })
        .await
        .unwrap_err();
        let done = auth
            .complete_login(pb::CompleteLoginRequest {
                mfa_challenge: challenge.clone(),
                code,
                recovery_code,
            })
            .await
            .unwrap()
            .into_inner();
        challenges.push(challenge);
        second_factor_tokens.push(done.tokens.unwrap());
    }

    // The hashes as stored now, read from the cluster beside the log.
    let stored: Vec<String> = {
        use diesel::prelude::*;
        use diesel_async::{AsyncConnection, RunQueryDsl};
        use identity::db::schema::users;
        let db = identity::db::embedded::running_cluster_url(&data, "identity").unwrap();
        let mut conn = diesel_async::AsyncPgConnection::establish(&db)
            .await
            .unwrap();
        users::table
            .select(users::password_hash)
            .load(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(stored.len(), 3);

    let log = serve.log.clone();
    assert_eq!(serve.terminate(), 0);
    let mut lines = log.lines();
    let at_least = match rust_log {
        Some(_) => 100,
        None => 5,
    };
    assert!(
        lines.len() > at_least,
        "{rust_log:?}: {} lines",
        lines.len()
    );
    lines.extend(cli_log);

    let mut secrets: Vec<(&str, String)> = vec![];
    for password in [
        first,
        second,
        third,
        fourth,
        wrong,
        root_password,
        BCRYPT_PASSWORD,
    ] {
        secrets.push(("a password", password.to_owned()));
    }
    // Every argon2id hash the service makes starts so (the tests' cost).
    secrets.push((
        "an argon2 hash",
        "$argon2id$v=19$m=4096,t=1,p=1$".to_owned(),
    ));
    secrets.push(("a bcrypt hash", BCRYPT_HASH.to_owned()));
    for hash in &stored {
        secrets.push(("a stored hash", hash.clone()));
        // Its salt and digest alone, were the parameters cut off.
        let tail = hash.rsplit_once(",p=1$").map_or(hash.as_str(), |(_, t)| t);
        secrets.push(("a stored hash's salt and digest", tail.to_owned()));
    }
    for tokens in [&t1, &t2, &t3, &t4, &root] {
        secrets.push(("an access token", tokens.access_token.clone()));
        secrets.push(("a refresh token", tokens.refresh_token.clone()));
        // The signature alone, in case a token is cut or split.
        let signature = tokens.access_token.rsplit_once('.').unwrap().1;
        secrets.push(("an access token's signature", signature.to_owned()));
    }
    secrets.push(("an API key", api_key.clone()));
    // Past its prefix (which is shown to people), in case it is cut.
    secrets.push(("an API key's secret part", api_key[12..].to_owned()));
    secrets.push(("a mistyped API key", mistyped[12..].to_owned()));
    secrets.push(("an exchanged access token", exchanged.access_token.clone()));
    secrets.push(("a TOTP secret (base32)", begun.secret_base32.clone()));
    let raw: String = base32_decode(&begun.secret_base32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    secrets.push(("a TOTP secret (hex)", raw));
    secrets.push((
        "an otpauth URI's secret",
        format!("secret={}", begun.secret_base32),
    ));
    for code in &recovery {
        secrets.push(("a recovery code", code.clone()));
        secrets.push(("a recovery code without its dash", code.replace('-', "")));
    }
    for challenge in challenges {
        secrets.push(("a login challenge", challenge));
    }
    for tokens in &second_factor_tokens {
        secrets.push(("a second-factor access token", tokens.access_token.clone()));
        secrets.push((
            "a second-factor refresh token",
            tokens.refresh_token.clone(),
        ));
    }
    secrets.push(("a verification token", verification));
    secrets.push(("a reset token", reset));
    assert_no_secret(&lines, &secrets);

    // Emails and canonical logins appear in plain words where a log line
    // means to name them; as statement parameters, in no form.
    let mut parameters: Vec<(&str, String)> = vec![];
    for (login, address) in [
        (username, email),
        (imported, imported_email),
        ("Root.Admin", "Root.Admin@Example.com"),
    ] {
        parameters.push(("an email", address.to_owned()));
        parameters.push(("a canonical email", address.to_lowercase()));
        parameters.push(("a canonical login", login.to_lowercase()));
    }
    for (what, value) in &parameters {
        // Every spelling but the plain one.
        for form in spellings(value).into_iter().skip(1) {
            if let Some(line) = lines.iter().find(|l| l.contains(&form)) {
                panic!("{what} as a parameter ({form}) in the log: {line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_trace_holds_a_secret_in_any_encoding() {
    // A directive naming the statement log itself cannot open it either.
    no_secret_in_the_log_at(Some("trace,tokio_postgres=trace")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_debug_holds_a_secret_in_any_encoding() {
    no_secret_in_the_log_at(Some("debug")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_the_default_level_holds_a_secret_in_any_encoding() {
    no_secret_in_the_log_at(None).await;
}

/// `identity keys generate` into a new folder, which logs "generated a
/// signing key" as text, with standard error going to `stderr`.
fn generate_key_logging_to(stderr: std::process::Stdio, env: &[(&str, &str)]) -> TempDir {
    let dir = TempDir::new("identity-colours");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_identity"));
    cmd.args(["keys", "generate"])
        .env("KEYS_DIR", dir.0.join("keys"))
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().unwrap();
    assert!(status.success());
    dir
}

const ESCAPE: &str = "\x1b[";

#[test]
fn logs_written_to_a_pipe_or_a_file_carry_no_colours() {
    // A pipe.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_identity"))
        .args(["keys", "generate"])
        .env("KEYS_DIR", TempDir::new("identity-colours").0.join("keys"))
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("generated a signing key"), "{stderr}");
    assert!(!stderr.contains(ESCAPE), "{stderr:?}");

    // A file.
    let logs = TempDir::new("identity-colour-logs");
    let path = logs.0.join("stderr.log");
    let file = std::fs::File::create(&path).unwrap();
    generate_key_logging_to(file.into(), &[]);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("generated a signing key"), "{text}");
    assert!(!text.contains(ESCAPE), "{text:?}");
}

/// What the binary writes to standard error when that is a terminal.
fn on_a_terminal(env: &[(&str, &str)]) -> String {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    let made = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(made, 0, "openpty");
    let master = unsafe { std::fs::File::from_raw_fd(master) };
    let slave = unsafe { std::os::fd::OwnedFd::from_raw_fd(slave) };
    // The child holds the only other end; ours closes when the call returns.
    generate_key_logging_to(slave.into(), env);
    let mut out = Vec::new();
    let mut master = master;
    // A terminal whose other end is closed reads as EIO once drained.
    let _ = master.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let coloured = on_a_terminal(&[]);
    assert!(coloured.contains("generated a signing key"), "{coloured}");
    assert!(coloured.contains(ESCAPE), "{coloured:?}");
    let empty = on_a_terminal(&[("NO_COLOR", "")]);
    assert!(empty.contains(ESCAPE), "an empty NO_COLOR is no request");
    let plain = on_a_terminal(&[("NO_COLOR", "1")]);
    assert!(plain.contains("generated a signing key"), "{plain}");
    assert!(!plain.contains(ESCAPE), "{plain:?}");
}

/// In JSON logs, a list is a JSON array, not a string holding one: the
/// migrations a start applied, and the keys it loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_in_json_logs_are_arrays() {
    let db = crate::helpers::TestDb::empty().await;
    let dir = TempDir::new("identity-log-lists");
    let mut cmd = command(&dir.0.join("data"));
    cmd.env("DATABASE_URL", &db.url);
    let serve = Serve::start_with(cmd);
    let lines = serve.log.lines();
    let field = |message: &str, name: &str| {
        let line = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("a {message:?} line: {lines:#?}"));
        line["fields"][name].clone()
    };
    let migrations = field("applied migrations", "migrations");
    let migrations = migrations.as_array().expect("an array of migrations");
    assert!(migrations.len() >= 3, "{migrations:?}");
    assert!(
        migrations
            .iter()
            .all(|m| m.as_str().is_some_and(|m| m.starts_with("20")))
    );
    let kids = field("identity ready", "kids");
    let kids = kids.as_array().expect("an array of kids");
    assert_eq!(kids.len(), 1, "{kids:?}");
    assert_eq!(
        kids[0].as_str(),
        field("identity ready", "signing_kid").as_str()
    );
    assert_eq!(serve.terminate(), 0);
}
