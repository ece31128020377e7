//! The `identity` command line: settings refused at start, migrate, and
//! createsuperuser.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::helpers::{TestDb, spawn_app_on};
use identity::proto::identity::v1 as pb;

pub fn identity(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_identity"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("IDENTITY_PASSWORD")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ARGON2_MEMORY_KIB", "4096")
        .env("ARGON2_ITERATIONS", "1")
        .env("DATA_DIR", "/nonexistent/never-used")
        .env("KEYS_DIR", "/nonexistent/never-used")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn a_bad_setting_stops_serve_with_one_line_naming_it_and_exit_2() {
    for (var, value) in [
        ("ACCESS_TOKEN_TTL", "abc"),
        ("REFRESH_TOKEN_TTL", "-5m"),
        ("JWT_ALGORITHM", "HS256"),
        ("LISTEN_ADDR", "not-an-address"),
        ("DB_POOL_SIZE", "0"),
        ("WEB_CONCURRENCY", "zero"),
        ("ALLOW_REGISTRATION", "perhaps"),
        ("LOG_FORMAT", "xml"),
        ("SENTRY_DSN", "not a dsn"),
        ("HASH_QUEUE", "0"),
        ("MAX_STREAMS", "0"),
        ("HTTP2_MAX_CONCURRENT_STREAMS", "0"),
        ("HTTP2_MAX_CONCURRENT_STREAMS", "lots"),
        // A certificate without its key.
        ("TLS_CERT", "/etc/hostname"),
    ] {
        let out = identity(&["serve"], &[(var, value)], None);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{var}: {stderr}");
        let named = if var == "TLS_CERT" { "TLS_KEY" } else { var };
        assert!(stderr.contains(named), "{var}: {stderr}");
    }
}

#[tokio::test]
async fn migrate_status_lists_the_applied_migrations() {
    let db = TestDb::migrated().await;
    let out = identity(&["migrate", "--status"], &[("DATABASE_URL", &db.url)], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().count() >= 1);
    assert!(stdout.lines().all(|l| l.starts_with("[X] ")), "{stdout}");

    let out = identity(&["migrate"], &[("DATABASE_URL", &db.url)], None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no pending migrations"));
}

#[tokio::test]
async fn createsuperuser_reads_the_password_from_env_or_stdin() {
    let db = TestDb::migrated().await;
    let url = db.url.clone();
    let out = identity(
        &[
            "createsuperuser",
            "--username",
            "root.admin",
            "--email",
            "admin1@example.com",
        ],
        &[
            ("DATABASE_URL", &url),
            ("IDENTITY_PASSWORD", "a long admin secret"),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = identity(
        &[
            "createsuperuser",
            "--username",
            "second.admin",
            "--email",
            "second@example.com",
        ],
        &[("DATABASE_URL", &url)],
        Some("another long secret\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Taken: a clear error, non-zero.
    let out = identity(
        &[
            "createsuperuser",
            "--username",
            "ROOT.ADMIN",
            "--email",
            "third@example.com",
        ],
        &[
            ("DATABASE_URL", &url),
            ("IDENTITY_PASSWORD", "a long admin secret"),
        ],
        None,
    );
    // Refused by the database's state: exit 1, the last line names it.
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().last(),
        Some("identity: that username is already taken"),
        "{stderr}"
    );

    // A short password is bad input, refused before anything is written:
    // exit 2 and one line, as for a bad setting.
    let out = identity(
        &[
            "createsuperuser",
            "--username",
            "shorty",
            "--email",
            "shorty@example.com",
        ],
        &[("DATABASE_URL", &url), ("IDENTITY_PASSWORD", "short")],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("identity: invalid password: "),
        "{stderr}"
    );

    let app = spawn_app_on(db, |_| {}).await;
    let list = app
        .list_users(pb::ListUsersRequest {
            is_superuser: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut names: Vec<_> = list.users.iter().map(|u| u.username.as_str()).collect();
    names.sort();
    assert_eq!(names, ["root", "root.admin", "second.admin"]);
    assert!(list.users.iter().all(|u| u.is_active && u.is_verified));
}

#[test]
fn keys_generate_rotate_and_list_manage_the_keys_dir() {
    let dir = crate::helpers::TempDir::new("identity-cli-keys");
    let keys = dir.0.join("keys");
    let keys_env = keys.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = identity(args, &[("KEYS_DIR", keys_env)], None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let first = run(&["keys", "generate"]);
    assert!(first.starts_with("generated "));
    let again = run(&["keys", "generate"]);
    assert!(
        again.contains("exists already"),
        "generate is idempotent: {again}"
    );
    assert_eq!(std::fs::read_dir(&keys).unwrap().count(), 1);

    run(&["keys", "rotate"]);
    let list = run(&["keys", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(lines[0].contains("signs") && lines[1].contains("verifies"));
    let first_kid = first.trim_start_matches("generated ").trim();
    assert!(
        lines[1].starts_with(first_kid),
        "the older key verifies: {list}"
    );

    // Another algorithm: a key of it is made, and signs; the others verify.
    let out = identity(
        &["keys", "generate"],
        &[("KEYS_DIR", keys_env), ("JWT_ALGORITHM", "ES256")],
        None,
    );
    assert!(out.status.success());
    let out = identity(
        &["keys", "list"],
        &[("KEYS_DIR", keys_env), ("JWT_ALGORITHM", "ES256")],
        None,
    );
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.lines().next().unwrap().contains("ES256"), "{list}");
    assert_eq!(list.lines().count(), 3);
}

#[tokio::test]
async fn argon2_settings_refused_together_stop_serve_with_a_hashing_error_not_a_database_one() {
    // Each is in range alone; argon2 wants at least 8 KiB per lane.
    let db = TestDb::migrated().await;
    let out = identity(
        &["serve"],
        &[
            ("DATABASE_URL", &db.url),
            ("ARGON2_MEMORY_KIB", "8"),
            ("ARGON2_PARALLELISM", "2"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("identity: password hashing: ")
            && last.contains("ARGON2_MEMORY_KIB=8")
            && last.contains("ARGON2_PARALLELISM=2"),
        "{stderr}"
    );
    assert!(!last.contains("database"), "{stderr}");
}

/// `identity healthcheck`: 0 while the service answers SERVING; 1 when its
/// database is away (NOT_SERVING) and when nothing answers at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_only_while_the_service_is_serving() {
    let app = crate::helpers::spawn_app().await;
    let addr = app.addr.to_string();
    let run = |addr: String| {
        tokio::task::spawn_blocking(move || {
            identity(
                &["healthcheck", "--addr", &addr, "--timeout", "2s"],
                &[],
                None,
            )
        })
    };
    let out = run(addr.clone()).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unspecified address: the loopback, on the same port.
    let any = format!("0.0.0.0:{}", app.addr.port());
    assert!(run(any).await.unwrap().status.success());

    crate::changes_watch::cut_database(&app, true).await;
    let start = std::time::Instant::now();
    loop {
        let out = run(addr.clone()).await.unwrap();
        if out.status.code() == Some(1) {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("NOT_SERVING"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "still serving"
        );
    }
    crate::changes_watch::allow_connections(&app).await;

    // Nothing listening.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = free.local_addr().unwrap().to_string();
    drop(free);
    let out = run(closed).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// Settings are global: a flag works before or after the subcommand's own
/// subcommand (`keys rotate --keys-dir X` as well as `keys --keys-dir X
/// rotate`), and overrides the environment.
#[test]
fn settings_flags_work_anywhere_on_the_command_line() {
    let dir = crate::helpers::TempDir::new("identity-cli-global");
    let keys = dir.0.join("keys");
    let keys = keys.to_str().unwrap();
    for args in [
        &["keys", "generate", "--keys-dir", keys][..],
        &["keys", "--keys-dir", keys, "rotate"][..],
        &[
            "keys",
            "rotate",
            "--keys-dir",
            keys,
            "--jwt-algorithm",
            "ES256",
        ][..],
    ] {
        let out = identity(args, &[], None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = identity(&["keys", "list", "--keys-dir", keys], &[], None);
    let list = String::from_utf8_lossy(&out.stdout);
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(list.contains("ES256") && list.contains("EdDSA"), "{list}");

    // A bad value of a global flag is a bad setting wherever it stands.
    let out = identity(
        &[
            "keys",
            "list",
            "--keys-dir",
            keys,
            "--jwt-algorithm",
            "HS256",
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("identity: ") && stderr.contains("JWT_ALGORITHM"));
}

/// `keys rotate` when no other key is KEYS_ACTIVATION_DELAY old: the new
/// key signs at the next reload (the documented fallback), and the command
/// says so with a warning; with an old enough key, it does not warn.
#[test]
fn keys_rotate_warns_when_the_new_key_signs_at_once() {
    let dir = crate::helpers::TempDir::new("identity-cli-young");
    let keys = dir.0.join("keys");
    let keys = keys.to_str().unwrap();
    let rotate = |delay: &str| {
        let out = identity(
            &["keys", "rotate"],
            &[("KEYS_DIR", keys), ("KEYS_ACTIVATION_DELAY", delay)],
            None,
        );
        assert!(out.status.success());
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The first key, and a second while the first is minutes young.
    for _ in 0..2 {
        let (stdout, stderr) = rotate("30m");
        assert!(stdout.contains("signs at once"), "{stdout}");
        assert!(stderr.contains("WARN"), "{stderr}");
        assert!(stderr.contains("KEYS_ACTIVATION_DELAY old"), "{stderr}");
    }
    // With a delay the older keys have already passed: staged, no warning.
    let (stdout, stderr) = rotate("0s");
    assert!(
        stdout.contains("signs after KEYS_ACTIVATION_DELAY (0s)"),
        "{stdout}"
    );
    assert!(!stderr.contains("WARN"), "{stderr}");
}

/// One rule for every command: an error is reported by one last line on
/// standard error starting `identity: `; exit 2 when what the command was
/// given is wrong (usage, a setting, input checked before any work), 1 when
/// the work failed or was refused.
#[test]
fn every_command_reports_an_error_in_one_identity_line_with_the_documented_code() {
    let dir = crate::helpers::TempDir::new("identity-cli-errors");
    let empty = dir.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = free.local_addr().unwrap().to_string();
    drop(free);
    /// The command line, its environment, the exit code, what the line names.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], i32, &'a str);
    let cases: &[Case] = &[
        (&["serve", "--no-such-flag"], &[], 2, "--no-such-flag"),
        (&["frobnicate"], &[], 2, "frobnicate"),
        (
            &["keys", "list"],
            &[("JWT_ALGORITHM", "HS256")],
            2,
            "JWT_ALGORITHM",
        ),
        (
            &[
                "createsuperuser",
                "--username",
                "a b",
                "--email",
                "a@example.com",
            ],
            &[("IDENTITY_PASSWORD", "a long admin secret")],
            2,
            "invalid username",
        ),
        (
            &[
                "createsuperuser",
                "--username",
                "abc",
                "--email",
                "not-an-email",
            ],
            &[("IDENTITY_PASSWORD", "a long admin secret")],
            2,
            "invalid email",
        ),
        (
            &["changes"],
            &[("IDENTITY_SERVER", "http://127.0.0.1:1")],
            2,
            "IDENTITY_TOKEN",
        ),
        (&["keys", "list"], &[("KEYS_DIR", empty)], 1, "keys"),
        (
            &["passwords", "check", "/nonexistent/list.txt"],
            &[],
            1,
            "/nonexistent/list.txt",
        ),
        (
            &["import", "/nonexistent/users.jsonl"],
            &[],
            1,
            "/nonexistent/users.jsonl",
        ),
        (
            &["healthcheck", "--addr", &closed, "--timeout", "2s"],
            &[],
            1,
            "cannot reach",
        ),
    ];
    for &(args, env, code, names) in cases {
        let out = identity(args, env, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("identity: "), "{args:?}: {stderr}");
        assert!(last.contains(names), "{args:?}: {stderr}");
        if code == 2 {
            // Nothing was done: the line alone, no log.
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        }
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
