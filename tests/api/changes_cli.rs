//! `identity changes`: the change feed printed by the command line, a gRPC
//! client of the real server (the binary, run as an operator would).

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{ROOT_PASSWORD, ROOT_USERNAME, TestApp, spawn_app};

/// The longest a test waits for the command to print or exit.
const DEADLINE: Duration = Duration::from_secs(30);

/// `identity changes ARGS` against `app`, as a client with `token` (none:
/// IDENTITY_TOKEN unset); nothing of the caller's environment leaks in.
fn command(app: &TestApp, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_identity"));
    cmd.arg("changes")
        .args(args)
        .env_clear()
        .env("IDENTITY_SERVER", format!("http://{}", app.addr))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(token) = token {
        cmd.env("IDENTITY_TOKEN", token);
    }
    cmd
}

/// Runs the command to its end (list mode).
async fn run(app: &TestApp, token: Option<&str>, args: &[&str]) -> Output {
    let child = command(app, token, args).spawn().expect("spawn identity");
    tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("identity changes exits in time")
        .unwrap()
}

/// Runs the command and returns its stdout lines; it must succeed.
async fn lines(app: &TestApp, token: &str, args: &[&str]) -> Vec<String> {
    let out = run(app, Some(token), args).await;
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// root's access token.
async fn root_token(app: &TestApp) -> String {
    app.login(ROOT_USERNAME, ROOT_PASSWORD)
        .await
        .expect("root logs in")
        .tokens
        .unwrap()
        .access_token
}

#[tokio::test]
async fn list_prints_each_change_made_through_the_api_with_its_fields() {
    let app = spawn_app().await;
    let token = root_token(&app).await;
    let alice = app.create_user("alice").await;
    app.update_user(&alice.id, &["first_name", "is_verified"], |u| {
        u.first_name = "Alice".into();
        u.is_verified = true;
    })
    .await
    .unwrap();

    let out = run(&app, Some(&token), &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let of_alice: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(&format!(" user={} ", alice.id)))
        .collect();
    let created = of_alice
        .iter()
        .find(|l| l.split(' ').nth(1) == Some("user_created"))
        .unwrap_or_else(|| panic!("no user_created line for alice:\n{stdout}"));
    let updated = of_alice
        .iter()
        .find(|l| l.split(' ').nth(1) == Some("user_updated"))
        .unwrap_or_else(|| panic!("no user_updated line for alice:\n{stdout}"));
    assert!(
        updated.contains(" fields=first_name,is_verified "),
        "{updated}"
    );
    for line in [created, updated] {
        // RFC 3339 in UTC first, the cursor last.
        let time = line.split(' ').next().unwrap();
        assert!(
            time.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(time).is_ok(),
            "{line}"
        );
        let cursor = line.rsplit(' ').next().unwrap();
        let hex = cursor.strip_prefix("cursor=").expect("cursor last");
        assert!(
            hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{line}"
        );
    }
    assert!(
        of_alice.iter().position(|l| l == created) < of_alice.iter().position(|l| l == updated),
        "commit order:\n{stdout}"
    );
    // Where to resume, for the operator.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resume with --after "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn json_lines_carry_the_cursor_and_after_resumes_just_after_it() {
    let app = spawn_app().await;
    let token = root_token(&app).await;
    for name in ["bob", "carol", "dave"] {
        app.create_user(name).await;
    }

    let all = lines(&app, &token, &["--json"]).await;
    assert!(all.len() >= 3, "{all:?}");
    let parsed: Vec<serde_json::Value> = all.iter().map(|l| json(l)).collect();
    for change in &parsed {
        for field in [
            "cursor",
            "commit_time",
            "kind",
            "user_id",
            "session_id",
            "group_id",
            "api_key_id",
            "actor_id",
            "rpc",
            "fields",
            "request_id",
            "end_reason",
        ] {
            assert!(change.get(field).is_some(), "{field} in {change}");
        }
        assert_eq!(change["cursor"].as_str().unwrap().len(), 32, "{change}");
    }
    let kinds: Vec<&str> = parsed.iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.iter().filter(|k| **k == "user_created").count() >= 3,
        "{kinds:?}"
    );

    // After each change: exactly the ones after it, none before, none twice.
    for (i, change) in parsed.iter().enumerate() {
        let cursor = change["cursor"].as_str().unwrap();
        let rest = lines(&app, &token, &["--json", "--after", cursor]).await;
        assert_eq!(rest, all[i + 1..], "after change {i}");
    }
}

#[tokio::test]
async fn kind_filters_and_an_unknown_kind_is_a_usage_error() {
    let app = spawn_app().await;
    let token = root_token(&app).await;
    let erin = app.create_user("erin").await;
    app.update_user(&erin.id, &["last_name"], |u| u.last_name = "E".into())
        .await
        .unwrap();
    app.login("erin", &crate::helpers::TestUser::named("erin").password)
        .await
        .unwrap();

    let updated = lines(&app, &token, &["--json", "--kind", "user_updated"]).await;
    assert!(!updated.is_empty());
    assert!(
        updated.iter().all(|l| json(l)["kind"] == "user_updated"),
        "{updated:?}"
    );

    // Repeated: either kind, nothing else.
    let two = lines(
        &app,
        &token,
        &[
            "--json",
            "--kind",
            "user_created",
            "--kind",
            "session_started",
            "--user",
            &erin.id,
        ],
    )
    .await;
    let kinds: Vec<String> = two
        .iter()
        .map(|l| json(l)["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["user_created", "session_started"]);

    let out = run(&app, Some(&token), &["--kind", "user_renamed"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn follow_prints_a_change_committed_after_it_started_and_stops_on_sigterm() {
    let app = spawn_app().await;
    let token = root_token(&app).await;
    let before = app.create_user("before").await;
    // The head of the feed now: everything before it was listed already.
    let listed = run(&app, Some(&token), &[]).await;
    let stderr = String::from_utf8(listed.stderr).unwrap();
    let head = stderr
        .split("resume with --after ")
        .nth(1)
        .expect("a cursor to resume from")
        .trim()
        .to_owned();

    let mut child = command(
        &app,
        Some(&token),
        &["--follow", "--json", "--after", &head],
    )
    .spawn()
    .expect("spawn identity");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let frank = app.create_user("frank").await;

    // Read line by line until frank's creation shows, within the deadline.
    let seen = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let change = json(&line);
            assert_ne!(
                change["user_id"].as_str(),
                Some(before.id.as_str()),
                "nothing from before --after: {line}"
            );
            if change["kind"] == "user_created" && change["user_id"] == frank.id.as_str() {
                return change;
            }
        }
        panic!("the stream ended before frank's creation showed");
    })
    .await
    .expect("frank's creation is printed while the command follows");
    assert_eq!(seen["cursor"].as_str().unwrap().len(), 32);

    // SIGTERM: a clean exit that says where to resume.
    let pid = child.id().expect("running") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("resume with --after "), "{stderr}");
}

#[tokio::test]
async fn without_a_superuser_token_it_exits_with_a_hint_about_identity_token() {
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("grace").await;
    // No token is a bad setting (2); a token the server refuses, a refusal (1).
    for (token, first, code) in [
        (None, "identity: IDENTITY_TOKEN is not set", 2),
        (
            Some("bad\ntoken"),
            "identity: IDENTITY_TOKEN is not a token",
            2,
        ),
        (Some("not-a-token"), "identity: UNAUTHENTICATED: ", 1),
        (
            Some(tokens.access_token.as_str()),
            "identity: PERMISSION_DENIED: ",
            1,
        ),
    ] {
        for mode in [&[][..], &["--follow"][..]] {
            let out = run(&app, token, mode).await;
            assert_eq!(out.status.code(), Some(code), "{first} {mode:?}");
            assert!(out.stdout.is_empty());
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert!(stderr.starts_with(first), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.contains("IDENTITY_TOKEN"), "{stderr}");
        }
    }
}

#[tokio::test]
async fn changes_made_in_sql_show_without_an_origin_and_a_closed_pipe_ends_the_command_quietly() {
    use diesel_async::SimpleAsyncConnection;
    let app = spawn_app().await;
    let token = root_token(&app).await;
    // More output than a pipe holds (64 KiB), by hand in SQL.
    app.db
        .connect()
        .await
        .batch_execute(
            "INSERT INTO groups (id, groupname, groupname_canonical, slug, search, create_time)
             SELECT gen_random_uuid(), 'g' || n, 'g' || n, 'g-' || n, '', now()
             FROM generate_series(1, 2000) AS n",
        )
        .await
        .unwrap();

    let mut child = command(&app, Some(&token), &["--json", "--kind", "group_created"])
        .spawn()
        .expect("spawn identity");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, stdout.next_line())
        .await
        .expect("a first line in time")
        .unwrap()
        .expect("a first line");
    let change = json(&first);
    assert_eq!(change["kind"], "group_created");
    assert!(!change["group_id"].as_str().unwrap().is_empty());
    for origin in ["actor_id", "rpc", "request_id"] {
        assert_eq!(change[origin], "", "{origin}: SQL by hand has none");
    }

    // The reader goes away, as `| head -1` does.
    drop(stdout);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("exits once its output is closed")
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
