//! Faults: SIGTERM under load, kill -9 under load, and the database stopped
//! and started again under a running service.

use std::{path::Path, process::Command, time::Duration};

use nix::sys::signal::Signal;
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{AuthServiceClient, TempDir, TestUser, UserServiceClient};
use crate::lifecycle::{Serve, command};
use identity::proto::identity::v1 as pb;

async fn channel(serve: &Serve) -> Channel {
    Channel::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_call_in_flight_finish_then_exits_cleanly() {
    let dir = TempDir::new("identity-term");
    let data = dir.0.join("data");
    let mut cmd = command(&data);
    // Slow hashing keeps the calls in flight; debug logs say when they start.
    cmd.env("ARGON2_MEMORY_KIB", "32768")
        .env("ARGON2_ITERATIONS", "8")
        .env("HASH_CONCURRENCY", "2")
        .env("RUST_LOG", "info,identity=debug");
    let serve = Serve::start_with(cmd);
    let users = UserServiceClient::new(channel(&serve).await);
    let seen = serve.log.len();
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let mut users = users.clone();
            tokio::spawn(async move {
                users
                    .create_user(TestUser::named(&format!("inflight{i}")).request())
                    .await
            })
        })
        .collect();
    assert!(
        serve
            .log
            .wait_for_count(seen, "call started", 6, Duration::from_secs(30))
    );
    let postmaster = std::fs::read_to_string(data.join("pg/postmaster.pid")).unwrap();
    let addr = serve.addr;

    serve.signal(Signal::SIGTERM);
    for call in calls {
        let result = call.await.unwrap();
        assert!(result.is_ok(), "an in-flight call completed: {result:?}");
    }
    assert_eq!(serve.terminate(), 0);
    // New calls are refused: nothing listens any more.
    assert!(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .is_err()
    );
    assert!(
        !data.join("pg/postmaster.pid").exists(),
        "the cluster stopped cleanly"
    );
    let pid: i32 = postmaster.lines().next().unwrap().parse().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_committed_write() {
    let dir = TempDir::new("identity-kill");
    let data = dir.0.join("data");
    let serve = Serve::start(&data);
    let users = UserServiceClient::new(channel(&serve).await);
    // Writes keep coming while the process is killed.
    let writer = {
        let mut users = users.clone();
        tokio::spawn(async move {
            let mut committed = Vec::new();
            for i in 0..400 {
                let name = format!("durable{i}");
                match users.create_user(TestUser::named(&name).request()).await {
                    Ok(_) => committed.push(name),
                    Err(_) => break,
                }
            }
            committed
        })
    };
    // Kill once some writes are in.
    for i in 0..10 {
        let name = format!("before{i}");
        users
            .clone()
            .create_user(TestUser::named(&name).request())
            .await
            .unwrap();
    }
    serve.signal(Signal::SIGKILL);
    let committed = writer.await.unwrap();
    drop(serve);

    let serve = Serve::start(&data);
    let mut auth = AuthServiceClient::new(channel(&serve).await);
    let password = TestUser::named("x").password;
    for name in committed.iter().chain(
        (0..10)
            .map(|i| format!("before{i}"))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let login = auth
            .login(pb::LoginRequest {
                login: name.clone(),
                password: password.clone(),
            })
            .await;
        assert!(
            login.is_ok(),
            "{name} was acknowledged, so it must survive: {login:?}"
        );
    }
    assert_eq!(serve.terminate(), 0);
}

/// Runs pg_ctl on the embedded cluster under `data`, as its owner.
fn pg_ctl(data: &Path, args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let bin = identity::db::embedded::find_binaries().expect("PostgreSQL binaries");
    let mut cmd = Command::new(bin.join("pg_ctl"));
    cmd.arg("-D")
        .arg(data.join("pg"))
        .args(args)
        .current_dir(data.join("run"));
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pg_ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_under_load_gives_unavailable_and_the_process_recovers() {
    let dir = TempDir::new("identity-dbdown");
    let data = dir.0.join("data");
    let serve = Serve::start(&data);
    let ch = channel(&serve).await;
    UserServiceClient::new(ch.clone())
        .create_user(TestUser::named("steadfast").request())
        .await
        .unwrap();
    let password = TestUser::named("steadfast").password;
    let mut health = HealthClient::new(ch.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    while watch.next().await.unwrap().unwrap().status != ServingStatus::Serving as i32 {}

    // Load, for the whole outage: every answer is OK or UNAVAILABLE, within
    // its deadline; never INTERNAL.
    let (stop_load, mut stopped) = tokio::sync::watch::channel(false);
    let load = {
        let mut auth = AuthServiceClient::new(ch.clone());
        let password = password.clone();
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..100_000 {
                if *stopped.borrow_and_update() {
                    break;
                }
                let mut req = tonic::Request::new(pb::LoginRequest {
                    login: "steadfast".into(),
                    password: password.clone(),
                });
                req.set_timeout(Duration::from_secs(5));
                codes.push(auth.login(req).await.err().map_or(Code::Ok, |s| s.code()));
            }
            codes
        })
    };

    pg_ctl(&data, &["stop", "-m", "fast", "-w"]);
    while watch.next().await.unwrap().unwrap().status != ServingStatus::NotServing as i32 {}
    let mut auth = AuthServiceClient::new(ch.clone());
    let status = auth
        .login(pb::LoginRequest {
            login: "steadfast".into(),
            password: password.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let log = data.join("postgresql.log");
    pg_ctl(&data, &["start", "-w", "-l", log.to_str().unwrap()]);
    while watch.next().await.unwrap().unwrap().status != ServingStatus::Serving as i32 {}
    let _ = stop_load.send(true);
    let codes = load.await.unwrap();
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Ok | Code::Unavailable)),
        "only OK or UNAVAILABLE under the outage: {:?}",
        codes
            .iter()
            .filter(|c| !matches!(c, Code::Ok | Code::Unavailable))
            .collect::<Vec<_>>()
    );
    assert!(codes.contains(&Code::Unavailable));

    // The same process serves again.
    auth.login(pb::LoginRequest {
        login: "steadfast".into(),
        password,
    })
    .await
    .unwrap();
    assert_eq!(serve.terminate(), 0);
    assert!(!data.join("pg/postmaster.pid").exists());
}
