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
