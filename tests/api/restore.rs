//! `identity backup`, `identity restore` and `identity after-restore`, and
//! the embedded cluster's configuration files: through the real binary,
//! each test on a DATA_DIR of its own (run as root, as CI runs, the
//! cluster and its tools run as `postgres`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{Clients, TempDir, TestUser, reason};
use crate::lifecycle::Serve;
use identity::proto::identity::v1 as pb;

const ADMIN_PASSWORD: &str = "the restore test's admin password";

/// `identity ARGS` on the DATA_DIR `data` (and the keys beside it, as
/// [`Serve`] has them), off the runtime's threads.
async fn identity(args: &[&str], data: &Path, env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let mut env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.push(("DATA_DIR".into(), data.to_string_lossy().into_owned()));
    env.push((
        "KEYS_DIR".into(),
        data.with_file_name("keys").to_string_lossy().into_owned(),
    ));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        crate::cli::identity(&args, &env, None)
    })
    .await
    .unwrap()
}

/// Standard output of a run that succeeded.
fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one `identity:` line a failed run wrote (last, after any log
/// line), after checking its exit code.
fn failed(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("identity: "))
        .collect();
    assert_eq!(errors.len(), 1, "one line: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().last(),
        Some(errors[0]),
        "{stderr}"
    );
    errors[0].to_owned()
}

async fn channel(serve: &Serve) -> Channel {
    Channel::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Logs in; the tokens.
async fn login(
    channel: &Channel,
    login: &str,
    password: &str,
) -> Result<pb::Tokens, tonic::Status> {
    Clients::new(channel, None)
        .auth
        .login(pb::LoginRequest {
            login: login.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().tokens.expect("tokens"))
}

async fn verify(channel: &Channel, token: &str) -> Result<pb::VerifyTokenResponse, tonic::Status> {
    Clients::new(channel, None)
        .auth
        .verify_token(pb::VerifyTokenRequest {
            access_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn refresh(channel: &Channel, token: &str) -> Result<pb::RefreshResponse, tonic::Status> {
    Clients::new(channel, None)
        .auth
        .refresh(pb::RefreshRequest {
            refresh_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Makes the superuser `admin` with `identity createsuperuser` (beside the
/// running service) and returns clients logged in as it.
async fn admin(data: &Path, channel: &Channel) -> Clients {
    let out = identity(
        &[
            "createsuperuser",
            "--username",
            "admin",
            "--email",
            "admin@example.com",
        ],
        data,
        &[("IDENTITY_PASSWORD", ADMIN_PASSWORD)],
    )
    .await;
    succeeded(&out);
    signed_in_admin(channel).await
}

/// Clients logged in as the superuser `admin` that [`admin`] made.
async fn signed_in_admin(channel: &Channel) -> Clients {
    let tokens = login(channel, "admin", ADMIN_PASSWORD).await.unwrap();
    Clients::new(channel, Some(&tokens.access_token))
}

async fn reset_token(admin: &Clients, email: &str) -> String {
    admin
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: email.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn reset_password(
    channel: &Channel,
    token: &str,
    password: &str,
) -> Result<(), tonic::Status> {
    Clients::new(channel, None)
        .accounts
        .reset_password(pb::ResetPasswordRequest {
            token: token.into(),
            new_password: password.into(),
        })
        .await
        .map(drop)
}

/// Refused as an account token spent already.
fn spent(result: Result<(), tonic::Status>) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "ACCOUNT_TOKEN_USED");
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

/// A connection to the running cluster's `database`, over its socket.
async fn cluster(data: &Path, database: &str) -> AsyncPgConnection {
    let url = identity::db::embedded::running_cluster_url(data, database).expect("its socket");
    AsyncPgConnection::establish(&url).await.unwrap()
}

/// The value of a server setting, as the server has it.
async fn show(conn: &mut AsyncPgConnection, name: &str) -> String {
    diesel::sql_query(format!("SELECT current_setting('{name}') AS value"))
        .get_result::<Setting>(conn)
        .await
        .unwrap()
        .value
}

fn backups(dir: &TempDir) -> PathBuf {
    let folder = dir.0.join("backups");
    std::fs::create_dir_all(&folder).unwrap();
    folder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_brings_the_dump_back_and_nothing_it_held_unspent_works_again() {
    let dir = TempDir::new("identity-restore");
    let data = dir.0.join("data");
    let serve = Serve::start(&data);
    let ch = channel(&serve).await;
    let admin = admin(&data, &ch).await;
    let alice = TestUser::named("alice");
    let bob = TestUser::named("bob");
    for user in [&alice, &bob] {
        admin.create_user(user.request()).await.unwrap();
    }
    let bob_user = admin
        .get_user(crate::helpers::Lookup::Username("bob"))
        .await
        .unwrap();
    let bob_tokens = login(&ch, "bob", &bob.password).await.unwrap();
    let alice_reset = reset_token(&admin, &alice.email).await;
    let bob_reset = reset_token(&admin, &bob.email).await;
    let bob_verification = admin
        .accounts
        .clone()
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: bob_user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;

    // The dump, while the service runs.
    let file = backups(&dir).join("identity.dump");
    let file_arg = file.to_str().unwrap();
    let out = succeeded(&identity(&["backup", file_arg], &data, &[]).await);
    assert!(out.starts_with(&format!("wrote {file_arg} (")), "{out}");
    assert!(out.contains("at migration 2026"), "{out}");
    assert_eq!(mode(&file), 0o600);
    assert!(std::fs::read(&file).unwrap().starts_with(b"PGDMP"));
    assert_eq!(
        std::fs::read_dir(file.parent().unwrap()).unwrap().count(),
        1,
        "nothing left beside it"
    );

    // Afterwards: alice's reset token spent on a new password; carol.
    reset_password(&ch, &alice_reset, "alice's password after the dump")
        .await
        .unwrap();
    admin
        .create_user(TestUser::named("carol").request())
        .await
        .unwrap();
    assert_eq!(serve.terminate(), 0);

    let out = succeeded(&identity(&["restore", file_arg], &data, &[]).await);
    assert!(out.starts_with(&format!("restored {file_arg} (")), "{out}");
    for line in [
        "ended 2 sessions (reason RESTORED)",
        "spent 2 password reset tokens and 1 email verification token",
        "dropped 0 logins waiting for their second factor",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in {out}");
    }

    let serve = Serve::start(&data);
    let ch = channel(&serve).await;
    // The dump's data, and nothing after it.
    login(&ch, "alice", &alice.password)
        .await
        .expect("the password of the dump");
    let later = login(&ch, "alice", "alice's password after the dump")
        .await
        .unwrap_err();
    assert_eq!(later.code(), Code::Unauthenticated);
    let admin = signed_in_admin(&ch).await;
    let carol = admin
        .get_user(crate::helpers::Lookup::Username("carol"))
        .await
        .unwrap_err();
    assert_eq!(carol.code(), Code::NotFound);

    // The token spent after the dump, and those never spent: refused.
    spent(reset_password(&ch, &alice_reset, "alice tries her link again").await);
    spent(reset_password(&ch, &bob_reset, "bob uses an old link").await);
    spent(
        Clients::new(&ch, None)
            .accounts
            .confirm_email(pb::ConfirmEmailRequest {
                token: bob_verification,
            })
            .await
            .map(drop),
    );

    // bob's session, live in the dump, has ended.
    let refused = refresh(&ch, &bob_tokens.refresh_token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = verify(&ch, &bob_tokens.access_token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(reason(&refused), "SESSION_ENDED");
    let sessions = admin
        .auth
        .clone()
        .list_sessions(pb::ListSessionsRequest {
            user_id: bob_user.id,
            include_ended: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].end_reason, "RESTORED");
    assert_eq!(serve.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_restore_ends_a_running_servers_sessions_and_restore_waits_for_it_to_stop() {
    let dir = TempDir::new("identity-after-restore");
    let data = dir.0.join("data");
    let serve = Serve::start(&data);
    let ch = channel(&serve).await;
    let dave = TestUser::named("dave");
    Clients::new(&ch, None)
        .create_user(dave.request())
        .await
        .unwrap();
    let tokens = login(&ch, "dave", &dave.password).await.unwrap();
    verify(&ch, &tokens.access_token).await.unwrap();

    // A dump on standard output; its report on standard error.
    let out = identity(&["backup", "-"], &data, &[]).await;
    assert!(out.status.success());
    assert!(out.stdout.starts_with(b"PGDMP"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrote standard output"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = backups(&dir).join("dave.dump");
    std::fs::write(&file, &out.stdout).unwrap();

    let refused = failed(
        &identity(&["restore", file.to_str().unwrap()], &data, &[]).await,
        1,
    );
    assert!(refused.contains("stop identity first"), "{refused}");

    let out = succeeded(&identity(&["after-restore"], &data, &[]).await);
    assert!(
        out.lines()
            .any(|l| l == "ended 1 session (reason RESTORED)"),
        "{out}"
    );
    // The server hears of it through the change feed.
    let start = Instant::now();
    let refused = loop {
        match verify(&ch, &tokens.access_token).await {
            Err(status) => break status,
            Ok(_) => assert!(
                start.elapsed() < Duration::from_secs(10),
                "still verified after after-restore"
            ),
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(reason(&refused), "SESSION_ENDED");
    let refused = refresh(&ch, &tokens.refresh_token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(serve.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_fails_leaves_the_old_database_in_place() {
    let dir = TempDir::new("identity-bad-restore");
    let data = dir.0.join("data");
    let serve = Serve::start(&data);
    let ch = channel(&serve).await;
    let erin = TestUser::named("erin");
    Clients::new(&ch, None)
        .create_user(erin.request())
        .await
        .unwrap();
    assert_eq!(serve.terminate(), 0);

    // A backup with no service running: the cluster is started and stopped.
    let file = backups(&dir).join("erin.dump");
    succeeded(&identity(&["backup", file.to_str().unwrap()], &data, &[]).await);
    assert!(!data.join("pg/postmaster.pid").exists(), "cluster stopped");

    // Cut short: pg_restore fails half-way, into a database of its own.
    let dump = std::fs::read(&file).unwrap();
    let cut = backups(&dir).join("cut.dump");
    std::fs::write(&cut, &dump[..dump.len() / 2]).unwrap();
    let line = failed(
        &identity(&["restore", cut.to_str().unwrap()], &data, &[]).await,
        1,
    );
    assert!(line.contains("pg_restore"), "{line}");
    // Not a dump at all: refused before anything is touched.
    let text = backups(&dir).join("notes.txt");
    std::fs::write(&text, "not a dump\n").unwrap();
    let line = failed(
        &identity(&["restore", text.to_str().unwrap()], &data, &[]).await,
        2,
    );
    assert!(line.contains(&*text.to_string_lossy()), "{line}");
    let missing = backups(&dir).join("missing.dump");
    failed(
        &identity(&["restore", missing.to_str().unwrap()], &data, &[]).await,
        1,
    );
    // A backup that cannot be written leaves nothing.
    let line = failed(
        &identity(&["backup", "/nonexistent/folder/x.dump"], &data, &[]).await,
        1,
    );
    assert!(line.contains("/nonexistent/folder/x.dump"), "{line}");

    let serve = Serve::start(&data);
    let ch = channel(&serve).await;
    login(&ch, "erin", &erin.password)
        .await
        .expect("the old data, in place");
    let mut postgres = cluster(&data, "postgres").await;
    let databases: Vec<Setting> =
        diesel::sql_query("SELECT datname::text AS value FROM pg_database ORDER BY 1")
            .load(&mut postgres)
            .await
            .unwrap();
    let names: Vec<&str> = databases.iter().map(|d| d.value.as_str()).collect();
    assert_eq!(names, ["identity", "postgres", "template0", "template1"]);
    drop(postgres);
    assert_eq!(serve.terminate(), 0);
}

/// A cluster made by an older version: one include, at the end, of an
/// `identity.conf` that held max_connections too, so an operator's
/// max_connections had no effect. The first start of this version keeps
/// what the cluster ran with; from then on the operator's line wins over
/// identity's defaults, and identity's socket settings still win over the
/// operator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_setting_in_postgresql_conf_wins_over_identitys_defaults_not_its_socket() {
    let dir = TempDir::new("identity-conf");
    let data = dir.0.join("data");
    let serve = Serve::start(&data);
    assert_eq!(serve.terminate(), 0);

    let main = data.join("pg/postgresql.conf");
    let text = std::fs::read_to_string(&main).unwrap();
    let old: String = text
        .lines()
        .filter(|l| !l.contains("identity"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &main,
        format!(
            "{old}max_connections = 57\nlisten_addresses = 'localhost'\n\n\
             include_if_exists = 'identity.conf'\n"
        ),
    )
    .unwrap();
    std::fs::write(
        data.join("pg/identity.conf"),
        "max_connections = 200\ntimezone = 'UTC'\nlisten_addresses = ''\n",
    )
    .unwrap();

    let settings = async |data: &Path| {
        let mut conn = cluster(data, "postgres").await;
        let values = (
            show(&mut conn, "max_connections").await,
            show(&mut conn, "listen_addresses").await,
            show(&mut conn, "timezone").await,
        );
        drop(conn);
        values
    };
    // The upgrade: what the cluster ran with, its ineffective line
    // commented out.
    let serve = Serve::start(&data);
    assert_eq!(
        settings(&data).await,
        ("200".to_owned(), String::new(), "UTC".to_owned())
    );
    assert_eq!(serve.terminate(), 0);
    let text = std::fs::read_to_string(&main).unwrap();
    assert!(text.lines().any(|l| l == "#max_connections = 57"), "{text}");
    let includes: Vec<&str> = text.lines().filter(|l| l.starts_with("include")).collect();
    assert_eq!(
        includes,
        [
            "include_if_exists = 'identity-defaults.conf'",
            "include = 'identity.conf'"
        ]
    );
    assert_eq!(text.lines().last(), Some("include = 'identity.conf'"));

    // The operator's line, appended as operators do: it wins.
    std::fs::write(&main, format!("{text}max_connections = 57\n")).unwrap();
    let serve = Serve::start(&data);
    assert_eq!(
        settings(&data).await,
        ("57".to_owned(), String::new(), "UTC".to_owned())
    );
    assert_eq!(serve.terminate(), 0);
    let text = std::fs::read_to_string(&main).unwrap();
    assert_eq!(text.lines().last(), Some("include = 'identity.conf'"));
}

#[tokio::test]
async fn a_pg_bin_dir_without_postgresql_is_refused_by_name_and_backup_needs_the_embedded_cluster()
{
    let dir = TempDir::new("identity-pg-bin");
    let data = dir.0.join("data");
    let line = failed(
        &identity(&["migrate"], &data, &[("PG_BIN_DIR", "/nonexistent")]).await,
        2,
    );
    assert!(
        line.starts_with("identity: invalid value for PG_BIN_DIR: /nonexistent"),
        "{line}"
    );
    // Server binaries, but no pg_dump: enough to serve, not to back up.
    let bin = dir.0.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["initdb", "pg_ctl", "postgres"] {
        std::fs::write(bin.join(tool), "").unwrap();
    }
    let bin = bin.to_str().unwrap();
    let line = failed(
        &identity(&["backup", "x.dump"], &data, &[("PG_BIN_DIR", bin)]).await,
        2,
    );
    assert!(
        line.contains("PG_BIN_DIR") && line.contains("pg_dump, pg_restore missing"),
        "{line}"
    );
    assert!(!data.exists(), "nothing was made");

    let line = failed(
        &identity(
            &["backup", "x.dump"],
            &data,
            &[("DATABASE_URL", "postgres://app@db.example/identity")],
        )
        .await,
        2,
    );
    assert!(
        line.starts_with("identity: DATABASE_URL: identity backup works on the embedded cluster"),
        "{line}"
    );
}

/// With DATABASE_URL, after-restore works as on the embedded cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_restore_works_with_database_url_too() {
    let app = crate::helpers::spawn_app().await;
    let (_, tokens) = app.signed_in_user("frank").await;
    let url = app.db.url.clone();
    let out = identity(
        &["after-restore"],
        Path::new("/nonexistent/unused"),
        &[("DATABASE_URL", &url)],
    )
    .await;
    let out = succeeded(&out);
    assert!(
        out.lines()
            .any(|l| l.starts_with("ended ") && l.ends_with("(reason RESTORED)")),
        "{out}"
    );
    let start = Instant::now();
    loop {
        match verify(&app.channel, &tokens.access_token).await {
            Err(status) => {
                assert_eq!(reason(&status), "SESSION_ENDED");
                break;
            }
            Ok(_) => assert!(start.elapsed() < Duration::from_secs(10), "still verified"),
        }
        tokio::task::yield_now().await;
    }
}

/// A dump restored on a new machine: the old cluster's transaction ids are
/// far ahead of the new one's, in the feed's rows and in its purge mark (an
/// old cluster has purged). After `identity restore`, the feed still
/// delivers the new cluster's changes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_restored_on_a_new_cluster_keeps_the_change_feed_moving() {
    use diesel_async::SimpleAsyncConnection;
    let dir = TempDir::new("identity-restore-elsewhere");
    let old = dir.0.join("old").join("data");
    let serve = Serve::start(&old);
    let ch = channel(&serve).await;
    let admin_old = admin(&old, &ch).await;
    admin_old
        .create_user(TestUser::named("carol").request())
        .await
        .unwrap();
    // The old cluster's transaction ids run far ahead of a new one's; its
    // changes grow old, and a start purges them (the purge mark moves up).
    let mut conn = cluster(&old, "identity").await;
    conn.batch_execute(
        "DO $$ BEGIN FOR i IN 1..3000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    admin_old
        .create_user(TestUser::named("dora").request())
        .await
        .unwrap();
    conn.batch_execute("UPDATE changes SET record_time = now() - interval '30 days'")
        .await
        .unwrap();
    drop(conn);
    assert_eq!(serve.terminate(), 0);
    let serve = Serve::start(&old);
    assert!(
        serve
            .log
            .wait_for(0, "purged old rows", Duration::from_secs(30)),
        "the purge at start"
    );
    let ch = channel(&serve).await;
    let admin_old = signed_in_admin(&ch).await;
    let erin = TestUser::named("erin");
    admin_old.create_user(erin.request()).await.unwrap();
    let file = backups(&dir).join("elsewhere.dump");
    let file = file.to_str().unwrap();
    succeeded(&identity(&["backup", file], &old, &[]).await);
    assert_eq!(serve.terminate(), 0);

    // The new machine: an empty DATA_DIR, restored, then served.
    let new = dir.0.join("new").join("data");
    succeeded(&identity(&["restore", file], &new, &[]).await);
    let serve = Serve::start(&new);
    let ch = channel(&serve).await;
    login(&ch, "erin", &erin.password)
        .await
        .expect("the dump's users");
    let admin = signed_in_admin(&ch).await;
    let fay = admin
        .create_user(TestUser::named("fay").request())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = admin
            .changes
            .clone()
            .list_changes(pb::ListChangesRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(created) = listed
            .changes
            .iter()
            .find(|c| c.kind == pb::ChangeKind::UserCreated as i32 && c.user_id == fay.id)
        {
            // And a cursor of the new cluster's is good to resume from.
            admin
                .changes
                .clone()
                .list_changes(pb::ListChangesRequest {
                    after_cursor: created.cursor.clone(),
                    ..Default::default()
                })
                .await
                .expect("a cursor taken after the restore resumes");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new cluster's change is listed: {:#?}",
            listed.changes
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(serve.terminate(), 0);
}
