//! The mesh scenarios (issue #15), with h2load (Debian's nghttp2-client)
//! as the load generator: a C client light enough that on two cores the
//! ratio describes identity, not the client. Its CPU share is reported.
//!
//! - `mesh`: Health/Check (the transport's ceiling), VerifyToken, the Envoy
//!   check and GetUser as the caller, on the server (verification cache on);
//!   then the same three on a second replica started with
//!   `VERIFY_CACHE=off` (one database read per call).
//! - `mesh_writes`: VerifyToken under h2load while a writer changes 100
//!   users or sessions a second through the service (UpdateUser,
//!   EndSession) and by hand in SQL, and checkers verify the changed users
//!   and sessions: an answer older than the guarantee is counted as stale
//!   (through this replica: the next call sees the change; in SQL: within
//!   the feed's delivery delay, checked at one second).
//! - `mesh_rss`: the server's peak memory while 100,000 distinct live
//!   sessions are verified (`BENCH_RSS_SESSIONS`).
//!
//! h2load sends one request body over and over, so its rows verify one
//! token; the checkers and `mesh_rss` spread over many. gRPC answers with
//! HTTP 200 whatever its status: the server's own call counts
//! (`identity_grpc_requests_total` by code, from `/metrics`) say how many
//! calls were OK, and any other code is reported as an error.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use diesel::sql_types::{Array, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use futures::FutureExt;
use identity::{
    proto::identity::v1::{
        self as pb, auth_service_client::AuthServiceClient, user_service_client::UserServiceClient,
    },
    token::{
        jwt::{Subject, TokenIssuer},
        keys::KeyStore,
    },
};
use prost::Message;
use tonic::Request;
use uuid::Uuid;

use crate::{
    drive::{self, Call, Outcome, Rng, Window, code},
    report::Row,
    scenarios::{Bench, Session},
    seed::{self, Seeded},
    server::{CpuMark, Server},
};

/// How long a change made by hand in SQL may take to reach the cache (the
/// feed's delivery delay, "well under a second").
const SQL_BOUND: Duration = Duration::from_secs(1);

/// Whether h2load is on this machine.
pub fn h2load_found() -> bool {
    Command::new("h2load")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A gRPC message as it goes on the wire: uncompressed, length-prefixed.
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(
        &u32::try_from(body.len())
            .expect("a small message")
            .to_be_bytes(),
    );
    frame.extend_from_slice(&body);
    frame
}

/// One unary RPC for h2load: its path, body and bearer token.
#[derive(Clone)]
pub struct Unary {
    /// `/package.Service/Method`.
    path: &'static str,
    body: Vec<u8>,
    bearer: Option<String>,
}

/// `identity_grpc_requests_total` by (method path, code), from `/metrics`.
async fn call_counts(server: &Server) -> HashMap<(String, String), f64> {
    let text = crate::scenarios::http_get(server, "/metrics").await;
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("identity_grpc_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                kv.strip_prefix(name)
                    .and_then(|v| v.strip_prefix("=\""))
                    .map(|v| v.trim_end_matches('"').to_owned())
            })
        };
        if let (Some(service), Some(method), Some(code), Ok(n)) = (
            label("service"),
            label("method"),
            label("code"),
            value.trim().parse::<f64>(),
        ) {
            *out.entry((format!("/{service}/{method}"), code))
                .or_default() += n;
        }
    }
    out
}

/// CPU seconds of this process's reaped children (h2load, once waited for).
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// What an h2load run measured.
struct H2Result {
    outcome: Outcome,
    /// h2load's CPU over its run, in % of one core.
    cpu: f64,
    notes: Vec<String>,
}

/// Runs h2load against `server` for `window` (its warm-up, then its
/// measurement): `connections` HTTP/2 connections with `in_flight` streams
/// in all. Blocking: call it on a blocking thread.
fn run_h2load(
    addr: std::net::SocketAddr,
    unary: &Unary,
    window: &Window,
    (connections, in_flight): (usize, usize),
    scratch: &Path,
) -> H2Result {
    let name = unary.path.rsplit('/').next().unwrap_or("call");
    let body = scratch.join(format!("h2load-{name}.bin"));
    let log = scratch.join(format!("h2load-{name}.log"));
    std::fs::write(&body, &unary.body).expect("write the request body");
    let warmup = window.from.saturating_duration_since(Instant::now());
    let measure = window.end - window.from;
    let streams = in_flight.div_ceil(connections).max(1);
    let mut cmd = Command::new("h2load");
    cmd.arg(format!("--duration={}ms", measure.as_millis().max(1)))
        .arg(format!("--warm-up-time={}ms", warmup.as_millis().max(1)))
        .arg(format!("--clients={connections}"))
        .arg(format!("--max-concurrent-streams={streams}"))
        .arg("--threads=1")
        .arg("--header=content-type: application/grpc")
        .arg("--header=te: trailers")
        .arg(format!("--data={}", body.display()))
        .arg(format!("--log-file={}", log.display()));
    if let Some(token) = &unary.bearer {
        cmd.arg(format!("--header=authorization: Bearer {token}"));
    }
    cmd.arg(format!("http://{addr}{}", unary.path));
    let cpu_before = children_cpu_seconds();
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let output = cmd.output().expect("run h2load (Debian's nghttp2-client)");
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let cpu = (children_cpu_seconds() - cpu_before) / elapsed * 100.0;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "h2load failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // "finished in 10.00s, 95700.00 req/s, 5.21MB/s"
    let seconds = stdout
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(',').next())
        .and_then(|s| s.trim().trim_end_matches('s').parse::<f64>().ok())
        .unwrap_or(measure.as_secs_f64());
    // "requests: N total, N started, N done, N succeeded, N failed, ..."
    let counts: HashMap<String, u64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .map(|l| {
            l.split(',')
                .filter_map(|part| {
                    let mut words = part.split_whitespace();
                    let n = words.next()?.parse().ok()?;
                    Some((words.next()?.to_owned(), n))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut outcome = Outcome::new(seconds);
    outcome.ok = counts.get("succeeded").copied().unwrap_or(0);
    for label in ["failed", "errored", "timeout"] {
        if let Some(&n) = counts.get(label).filter(|&&n| n > 0) {
            outcome
                .errors
                .insert(format!("HTTP_{}", label.to_uppercase()), n);
        }
    }
    // Latencies of the calls started after the warm-up.
    let measured_from = started_wall + warmup;
    let from_us = measured_from
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    if let Ok(file) = std::fs::File::open(&log) {
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            let mut cols = line.split('\t');
            let (Some(start), Some(status), Some(took)) = (cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            let (Ok(start), Ok(took)) = (start.parse::<u64>(), took.parse::<u64>()) else {
                continue;
            };
            if start >= from_us && status == "200" {
                outcome.latency.saturating_record(took.max(1));
            }
        }
    }
    let _ = std::fs::remove_file(&log);
    let mean = |l: &str| {
        stdout
            .lines()
            .find(|x| x.starts_with(l))
            .map(|x| x.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    H2Result {
        outcome,
        cpu,
        notes: vec![format!(
            "h2load {connections}x{streams} streams, one request repeated; {}",
            mean("time for request:")
        )],
    }
}

/// The cursor of a shared list: each call takes the next item.
struct Next(AtomicUsize);

impl Next {
    fn take(&self, n: usize) -> Option<usize> {
        let i = self.0.fetch_add(1, Ordering::Relaxed);
        (i < n).then_some(i)
    }
}

/// A change the writer made to a watched user, and when it was answered.
#[derive(Clone, Copy)]
struct Version {
    n: u64,
    /// When the write was acknowledged (the RPC answered, or the SQL
    /// committed).
    acked: Instant,
    /// How long after that every answer must show it.
    bound: Duration,
}

/// What the writer did, for the checkers.
#[derive(Default)]
struct Ledger {
    /// The versions written to each watched user, oldest first.
    users: Vec<Mutex<Vec<Version>>>,
    /// The spare sessions the writer ended, when.
    ended: Vec<Mutex<Option<Instant>>>,
}

impl Ledger {
    /// The newest version of watched user `i` every answer must show at
    /// `at`.
    fn required(&self, i: usize, at: Instant) -> u64 {
        self.users[i]
            .lock()
            .expect("unpoisoned")
            .iter()
            .filter(|v| v.acked + v.bound <= at)
            .map(|v| v.n)
            .max()
            .unwrap_or(0)
    }
}

/// The version a first name carries: "w<n>" (0 before any write).
fn version_of(first_name: &str) -> u64 {
    first_name
        .strip_prefix('w')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The writer of `mesh_writes`: each write is its own task, so that a slow
/// one does not hold back the rate.
struct Writer {
    users: UserServiceClient<tonic::transport::Channel>,
    auth: AuthServiceClient<tonic::transport::Channel>,
    ledger: Arc<Ledger>,
    watched: Arc<Vec<Session>>,
    spare: Arc<Vec<Session>>,
    admin: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    pool: identity::db::Pool,
}

impl Writer {
    /// Write `n`: every other one ends a spare session (EndSession); the
    /// rest change a watched user's first name to `w<n>`, one in four of
    /// them by hand in SQL, the others through UpdateUser.
    async fn write(&self, n: u64) -> Result<(), String> {
        let j = (n / 2) as usize;
        if n.is_multiple_of(2) && j < self.spare.len() {
            let mut request = Request::new(pb::EndSessionRequest {
                session_id: self.spare[j].session_id.to_string(),
            });
            request
                .metadata_mut()
                .insert("authorization", self.admin.clone());
            self.auth
                .clone()
                .end_session(request)
                .await
                .map_err(|s| format!("EndSession {}", code(s)))?;
            *self.ledger.ended[j].lock().expect("unpoisoned") = Some(Instant::now());
            return Ok(());
        }
        let i = j % self.watched.len();
        let id = self.watched[i].user_id;
        let first_name = format!("w{n}");
        let bound = if n % 8 == 1 {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            diesel::sql_query("UPDATE users SET first_name = $1 WHERE id = $2")
                .bind::<Text, _>(&first_name)
                .bind::<SqlUuid, _>(id)
                .execute(&mut conn)
                .await
                .map_err(|e| format!("SQL {e}"))?;
            SQL_BOUND
        } else {
            let mut request = Request::new(pb::UpdateUserRequest {
                user: Some(pb::User {
                    id: id.to_string(),
                    first_name,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["first_name".into()],
                }),
            });
            request
                .metadata_mut()
                .insert("authorization", self.admin.clone());
            self.users
                .clone()
                .update_user(request)
                .await
                .map_err(|s| format!("UpdateUser {}", code(s)))?;
            Duration::ZERO
        };
        self.ledger.users[i]
            .lock()
            .expect("unpoisoned")
            .push(Version {
                n,
                acked: Instant::now(),
                bound,
            });
        Ok(())
    }
}

impl Bench<'_> {
    /// The request bodies of the unary scenarios, for the first logged-in
    /// user.
    pub fn unaries(&self) -> [(&'static str, &'static str, Unary); 4] {
        let s = &self.sessions()[0];
        let check = crate::scenarios::check_request(&s.access_token);
        [
            (
                "h2_health",
                "Health/Check (h2load)",
                Unary {
                    path: "/grpc.health.v1.Health/Check",
                    body: grpc_frame(&tonic_health::pb::HealthCheckRequest::default()),
                    bearer: None,
                },
            ),
            (
                "h2_verify",
                "VerifyToken (h2load)",
                Unary {
                    path: "/identity.v1.AuthService/VerifyToken",
                    body: grpc_frame(&pb::VerifyTokenRequest {
                        access_token: s.access_token.clone(),
                    }),
                    bearer: None,
                },
            ),
            (
                "h2_envoy",
                "Envoy Check (h2load)",
                Unary {
                    path: "/envoy.service.auth.v3.Authorization/Check",
                    body: grpc_frame(&check),
                    bearer: None,
                },
            ),
            (
                "h2_get_self",
                "GetUser as the caller (h2load)",
                Unary {
                    path: "/identity.v1.UserService/GetUser",
                    body: grpc_frame(&pb::GetUserRequest {
                        lookup: Some(pb::get_user_request::Lookup::Id(s.user_id.to_string())),
                    }),
                    bearer: Some(s.access_token.clone()),
                },
            ),
        ]
    }

    /// Runs h2load for `unary` against `server` in `window`; the row counts
    /// as OK only the calls the server counted OK.
    pub async fn h2(
        &self,
        server: &Server,
        (name, label): (&str, &str),
        unary: Unary,
        window: Window,
    ) -> Row {
        let before = call_counts(server).await;
        server.reset_peak_rss();
        let mark = CpuMark::now(server);
        let shape = (self.settings.connections, self.settings.in_flight);
        let (scratch, addr) = (self.scratch.clone(), server.addr);
        let (result, unary) = tokio::task::spawn_blocking(move || {
            (run_h2load(addr, &unary, &window, shape, &scratch), unary)
        })
        .await
        .expect("the h2load thread");
        let mut shares = mark.shares(server);
        shares.generator += result.cpu;
        let after = call_counts(server).await;
        let mut outcome = result.outcome;
        let (mut server_ok, mut cut_off) = (0.0, 0.0);
        for ((path, code), n) in &after {
            if path != unary.path {
                continue;
            }
            let delta = n - before
                .get(&(path.clone(), code.clone()))
                .copied()
                .unwrap_or(0.0);
            if code == "Ok" {
                server_ok = delta;
            } else if code == "Cancelled" || code == "Unknown" {
                // The calls in flight when h2load stopped and went away
                // (seen as either); more than that many are errors.
                cut_off += delta;
            } else if delta > 0.0 {
                outcome.errors.insert(code.clone(), delta as u64);
            }
        }
        let in_flight = self.settings.in_flight as f64;
        if cut_off > in_flight {
            outcome
                .errors
                .insert("CANCELLED_OR_UNKNOWN".into(), cut_off as u64);
        }
        let mut notes = result.notes;
        notes.push(format!(
            "h2load's CPU {:.0}% of one core; the server counted {server_ok} OK calls (warm-up included) \
             and {cut_off} cut off when h2load stopped (Cancelled or Unknown, at most one per stream)",
            result.cpu
        ));
        if server_ok < outcome.ok as f64 {
            // Answers that were not OK calls (or not counted): none of them
            // counts as OK.
            outcome
                .errors
                .insert("NOT_OK_ON_SERVER".into(), outcome.ok - server_ok as u64);
            outcome.ok = server_ok as u64;
        }
        let mut row = Row::new(name, label, outcome).with_notes(notes);
        row.cpu = Some(shares);
        row.server_rss = Some(server.peak_rss());
        row
    }

    /// `mesh`: the transport ceiling and the three fresh checks on this
    /// server, then the checks on a replica with the cache off.
    pub async fn mesh(&self) -> Vec<Row> {
        if !h2load_found() {
            assert!(
                self.settings.smoke,
                "the mesh scenarios need h2load: apt-get install nghttp2-client"
            );
            eprintln!("h2load not found: mesh skipped (apt-get install nghttp2-client)");
            return Vec::new();
        }
        let mut rows = Vec::new();
        for (name, label, unary) in self.unaries() {
            rows.push(
                self.h2(self.server, (name, label), unary, self.window())
                    .await,
            );
        }
        // The same GetUser as the caller, authenticated by an API key of
        // the same user (issue #16).
        let key = self.api_key_of(self.sessions()[0].user_id).await;
        let (_, _, mut by_key) = self.unaries().into_iter().nth(3).expect("GetUser");
        by_key.bearer = Some(key);
        rows.push(
            self.h2(
                self.server,
                (
                    "h2_get_self_key",
                    "GetUser as the caller, by API key (h2load)",
                ),
                by_key,
                self.window(),
            )
            .await,
        );
        let off = self.replica("cache-off", &[("VERIFY_CACHE", "off")]).await;
        for (name, label, unary) in self.unaries().into_iter().skip(1) {
            let name = format!("{name}_off");
            let label = label.replace("(h2load)", "(h2load, VERIFY_CACHE=off)");
            rows.push(self.h2(&off, (&name, &label), unary, self.window()).await);
        }
        tokio::task::spawn_blocking(move || drop(off))
            .await
            .expect("the replica stops");
        rows
    }

    /// `access_log`: VerifyToken through h2load on two replicas alike but
    /// for `ACCESS_LOG` (on, then off, then on, then off again, so that a
    /// drift of the machine shows as a difference between the two rounds),
    /// each writing JSON lines to a pipe that the harness drains, as a
    /// container runtime would.
    pub async fn access_log(&self) -> Vec<Row> {
        if !h2load_found() {
            assert!(
                self.settings.smoke,
                "the access_log scenario needs h2load: apt-get install nghttp2-client"
            );
            eprintln!("h2load not found: access_log skipped (apt-get install nghttp2-client)");
            return Vec::new();
        }
        let on = self.replica("access-on", &[("ACCESS_LOG", "on")]).await;
        let off = self.replica("access-off", &[("ACCESS_LOG", "off")]).await;
        // A replica just started answers from the database until its
        // verification cache is fresh: measure both once it is.
        for server in [&on, &off] {
            self.until_cached(server).await;
        }
        let (_, _, verify) = self.unaries().into_iter().nth(1).expect("VerifyToken");
        // A round not reported: whichever replica ran first was slower in
        // its first window, on or off.
        for server in [&on, &off] {
            self.h2(
                server,
                ("access_warm", "warm-up"),
                verify.clone(),
                self.window(),
            )
            .await;
        }
        let mut rows = Vec::new();
        for round in ["", "2"] {
            for (server, state) in [(&on, "on"), (&off, "off")] {
                let name = format!("access_{state}{round}");
                let label = format!("VerifyToken, ACCESS_LOG={state} (h2load)");
                rows.push(
                    self.h2(server, (&name, &label), verify.clone(), self.window())
                        .await,
                );
            }
        }
        tokio::task::spawn_blocking(move || drop((on, off)))
            .await
            .expect("the replicas stop");
        rows
    }

    /// Calls VerifyToken on `server` until its verification cache answers
    /// a whole burst of calls (its miss counter stands still while its hit
    /// counter moves), or two minutes have gone: a replica just started
    /// reads the database until its feed consumer has caught up.
    async fn until_cached(&self, server: &Server) {
        let token = self.sessions()[0].access_token.clone();
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .expect("an address")
            .connect()
            .await
            .expect("connect to the replica");
        let mut auth = AuthServiceClient::new(channel);
        let counters = || async {
            let metrics = crate::scenarios::http_get(server, "/metrics").await;
            let value = |name: &str| {
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            (
                value("identity_verify_cache_hits_total "),
                value("identity_verify_cache_misses_total "),
            )
        };
        let started = Instant::now();
        loop {
            let (hits, misses) = counters().await;
            for _ in 0..200 {
                auth.verify_token(pb::VerifyTokenRequest {
                    access_token: token.clone(),
                })
                .await
                .expect("VerifyToken");
            }
            let (hits_after, misses_after) = counters().await;
            if misses_after == misses && hits_after >= hits + 200.0 {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the replica's verification cache never answered a whole burst"
            );
        }
    }

    /// A new API key of `user`, made by the superuser: its secret.
    async fn api_key_of(&self, user: Uuid) -> String {
        let mut request = Request::new(pb::CreateApiKeyRequest {
            user_id: user.to_string(),
            display_name: "bench".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", self.admin.clone());
        pb::api_key_service_client::ApiKeyServiceClient::new(self.channel(0))
            .create_api_key(request)
            .await
            .expect("CreateApiKey")
            .into_inner()
            .secret
    }

    /// A second `identity serve` on the same database and keys.
    pub async fn replica(
        &self,
        dir: &str,
        envs: &'static [(&'static str, &'static str)],
    ) -> Server {
        let (dir, keys, url) = (
            self.scratch.join(dir),
            self.keys_dir.clone(),
            self.database_url.clone(),
        );
        tokio::task::spawn_blocking(move || Server::start_with(&dir, &keys, Some(&url), envs))
            .await
            .expect("the replica starts")
    }

    /// Sessions started in SQL for `n` users (seeded users from index
    /// `first`, wrapping), with access tokens signed by the server's own
    /// key: as Login makes them, without an argon2 hash each.
    pub async fn mint_sessions(&self, seeded: &Seeded, first: usize, n: usize) -> Vec<Session> {
        let keys = KeyStore::load(&self.keys_dir, self.config.jwt_algorithm, Duration::ZERO)
            .expect("the server's keys");
        let issuer = TokenIssuer::new(
            keys,
            self.config.jwt_issuer.clone(),
            self.config.jwt_audience.clone(),
            self.config.access_token_ttl,
        );
        let users = seeded.ids.len() - 1;
        let mut out = Vec::with_capacity(n);
        let mut conn = self.pool.get().await.expect("a connection");
        let pwd = ["pwd".to_owned()];
        for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
            let mut ids = Vec::new();
            let mut users_of = Vec::new();
            for &k in chunk {
                let i = 1 + (first + k) % users;
                let session_id = Uuid::now_v7();
                let user_id = seeded.ids[i];
                let username = seed::username(i);
                let email = format!("{username}@bench.example");
                let (access_token, _) = issuer
                    .issue(Subject {
                        user_id,
                        session_id,
                        username: &username,
                        email: &email,
                        is_superuser: false,
                        is_active: true,
                        is_verified: true,
                        groups: Vec::new(),
                        amr: &pwd,
                    })
                    .expect("a token");
                ids.push(session_id);
                users_of.push(user_id);
                out.push(Session {
                    user_id,
                    session_id,
                    access_token,
                    refresh_token: String::new(),
                });
            }
            diesel::sql_query(
                "INSERT INTO sessions (id, user_id, refresh_hash, refresh_expire_time) \
                 SELECT s.id, s.user_id, sha256(convert_to(s.id::text, 'UTF8')), \
                 now() + interval '1 day' FROM unnest($1::uuid[], $2::uuid[]) AS s(id, user_id)",
            )
            .bind::<Array<SqlUuid>, _>(&ids)
            .bind::<Array<SqlUuid>, _>(&users_of)
            .execute(&mut conn)
            .await
            .expect("insert the sessions");
        }
        out
    }

    /// `mesh_rss`: every one of `BENCH_RSS_SESSIONS` distinct live sessions
    /// verified once, 64 calls in flight; the server's peak memory.
    pub async fn mesh_rss(&self, seeded: &Seeded) -> Vec<Row> {
        let n = self.settings.rss_sessions;
        let started = Instant::now();
        let sessions = Arc::new(self.mint_sessions(seeded, 0, n).await);
        eprintln!(
            "started {n} sessions in SQL in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let next = Arc::new(Next(AtomicUsize::new(0)));
        self.server.reset_peak_rss();
        let mark = CpuMark::now(self.server);
        let began = Instant::now();
        let workers: Vec<_> = (0..self.settings.in_flight)
            .map(|w| {
                let mut client = AuthServiceClient::new(self.channel(w));
                let (sessions, next) = (sessions.clone(), next.clone());
                tokio::spawn(async move {
                    let mut outcome = Outcome::new(1.0);
                    while let Some(i) = next.take(sessions.len()) {
                        let s = &sessions[i];
                        let start = Instant::now();
                        let result = match client
                            .verify_token(pb::VerifyTokenRequest {
                                access_token: s.access_token.clone(),
                            })
                            .await
                        {
                            Ok(r)
                                if r.get_ref()
                                    .user
                                    .as_ref()
                                    .is_some_and(|u| u.id == s.user_id.to_string()) =>
                            {
                                Ok(())
                            }
                            Ok(_) => Err("WRONG_USER".to_owned()),
                            Err(status) => Err(code(status)),
                        };
                        let done = Instant::now();
                        let window = Window {
                            from: began,
                            end: done + Duration::from_secs(1),
                        };
                        outcome.record(&window, done, done - start, result);
                    }
                    outcome
                })
            })
            .collect();
        let mut outcome = Outcome::new(1.0);
        for w in workers {
            outcome.merge(&w.await.expect("a verifying task"));
        }
        let took = began.elapsed().as_secs_f64();
        let peak = self.server.peak_rss();
        let shares = mark.shares(self.server);
        let metrics = crate::scenarios::http_get(self.server, "/metrics").await;
        let gauge = |name: &str| {
            metrics.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        outcome.seconds = took;
        let mut row = Row::new(
            "mesh_rss",
            "distinct live sessions verified, peak RSS",
            outcome,
        )
        .with_notes(vec![format!(
            "{n} distinct sessions, each verified once in {took:.1} s; verification cache entries now {}, \
             misses {}; peak RSS {:.1} MiB",
            gauge("identity_verify_cache_entries").map_or("-".into(), |v| format!("{v}")),
            gauge("identity_verify_cache_misses_total").map_or("-".into(), |v| format!("{v}")),
            peak as f64 / 1048576.0
        )]);
        row.cpu = Some(shares);
        row.server_rss = Some(peak);
        vec![row]
    }

    /// `mesh_writes`: h2load's VerifyToken beside a writer of 100 changes a
    /// second and checkers that count stale answers.
    pub async fn mesh_writes(&self, seeded: &Seeded) -> Vec<Row> {
        if !h2load_found() {
            assert!(
                self.settings.smoke,
                "the mesh scenarios need h2load: apt-get install nghttp2-client"
            );
            return Vec::new();
        }
        let total = self.settings.warmup() + self.settings.measure();
        let rate = self.settings.writes_per_second;
        // The writer ends one spare session every other write.
        let spare_count = (rate * total.as_secs_f64() / 2.0) as usize + 64;
        let watched: Vec<Session> = self.sessions().iter().take(64).cloned().collect();
        let spare = self
            .mint_sessions(seeded, seeded.ids.len() / 2, spare_count)
            .await;
        let ledger = Arc::new(Ledger {
            users: watched.iter().map(|_| Mutex::default()).collect(),
            ended: spare.iter().map(|_| Mutex::default()).collect(),
        });
        let (watched, spare) = (Arc::new(watched), Arc::new(spare));
        let window = self.window();

        // The writer: one change at a time, `rate` a second, in turn an
        // UpdateUser, an EndSession, and every fourth user change by hand
        // in SQL.
        let writer = Arc::new(Writer {
            users: UserServiceClient::new(self.channel(0)),
            auth: AuthServiceClient::new(self.channel(1)),
            ledger: ledger.clone(),
            watched: watched.clone(),
            spare: spare.clone(),
            admin: self.admin.clone(),
            pool: self.pool.clone(),
        });
        let writing = {
            let end = window.end;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut writes = tokio::task::JoinSet::new();
                let mut n = 0u64;
                while Instant::now() < end {
                    tick.tick().await;
                    n += 1;
                    let writer = writer.clone();
                    writes.spawn(async move { writer.write(n).await });
                }
                let failed: Vec<String> = writes
                    .join_all()
                    .await
                    .into_iter()
                    .filter_map(Result::err)
                    .collect();
                (n, failed)
            })
        };

        // The checkers: VerifyToken of a watched user (its version at least
        // the one required when the call started) or of a spare session
        // (refused once its end was answered).
        let refused = Arc::new(AtomicU64::new(0));
        let checkers: Vec<Call> = (0..(self.settings.in_flight / 8).max(2))
            .map(|w| {
                let client = AuthServiceClient::new(self.channel(w));
                let refused = refused.clone();
                let (ledger, watched, spare) = (ledger.clone(), watched.clone(), spare.clone());
                let mut rng = Rng::new(7000 + w as u64);
                Box::new(move || {
                    let mut client = client.clone();
                    let ledger = ledger.clone();
                    let pick = rng.below(watched.len() + spare.len());
                    let at = Instant::now();
                    if pick < watched.len() {
                        let required = ledger.required(pick, at);
                        let token = watched[pick].access_token.clone();
                        async move {
                            let r = client
                                .verify_token(pb::VerifyTokenRequest {
                                    access_token: token,
                                })
                                .await
                                .map_err(code)?
                                .into_inner();
                            let seen = r.user.map_or(0, |u| version_of(&u.first_name));
                            if seen < required {
                                Err("STALE_USER".into())
                            } else {
                                Ok(())
                            }
                        }
                        .boxed()
                    } else {
                        let j = pick - watched.len();
                        let ended = ledger.ended[j].lock().expect("unpoisoned").is_some();
                        let token = spare[j].access_token.clone();
                        let refused = refused.clone();
                        async move {
                            let r = client
                                .verify_token(pb::VerifyTokenRequest {
                                    access_token: token,
                                })
                                .await;
                            if r.is_err() {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            match (ended, r) {
                                (true, Ok(_)) => Err("STALE_SESSION".into()),
                                (true, Err(s)) if s.code() == tonic::Code::Unauthenticated => {
                                    Ok(())
                                }
                                (true, Err(s)) => Err(code(s)),
                                (false, Ok(_)) => Ok(()),
                                // Ended while the call was in flight.
                                (false, Err(s)) if s.code() == tonic::Code::Unauthenticated => {
                                    Ok(())
                                }
                                (false, Err(s)) => Err(code(s)),
                            }
                        }
                        .boxed()
                    }
                }) as Call
            })
            .collect();

        let verify = self.unaries().into_iter().nth(1).expect("VerifyToken").2;
        let (h2, checked) = tokio::join!(
            self.h2(
                self.server,
                (
                    "h2_verify_writes",
                    "VerifyToken under 100 writes/s (h2load)"
                ),
                verify,
                window
            ),
            drive::drive(checkers, window),
        );
        let (writes, failed) = writing.await.expect("the writer");
        let mut h2 = h2;
        // The server's count of refused VerifyToken calls includes the
        // checkers' (of ended sessions): those are not h2load's.
        let refused = AtomicU64::load(&refused, Ordering::Relaxed);
        if let Some(n) = h2.outcome.errors.get_mut("Unauthenticated") {
            *n = n.saturating_sub(refused);
        }
        h2.outcome.errors.retain(|_, n| *n > 0);
        h2.notes.push(format!(
            "writer: {writes} changes in {:.1} s ({:.0}/s): UpdateUser, EndSession, and one user change in four by SQL; {} failed {:?}",
            total.as_secs_f64(),
            writes as f64 / total.as_secs_f64(),
            failed.len(),
            failed.iter().take(3).collect::<Vec<_>>(),
        ));
        let stale = checked
            .errors
            .iter()
            .filter(|(k, _)| k.starts_with("STALE"))
            .map(|(_, v)| v)
            .sum::<u64>();
        let notes = vec![format!(
            "{} answers checked, {stale} stale: a change through this replica must show in the next call, one in SQL within {} ms",
            checked.ok + checked.errors.values().sum::<u64>(),
            SQL_BOUND.as_millis()
        )];
        vec![
            h2,
            Row::new(
                "stale",
                "checkers of the changed users and sessions",
                checked,
            )
            .with_notes(notes),
        ]
    }
}
