//! `cargo bench --bench load`: the release-built server on the embedded
//! PostgreSQL (or `DATABASE_URL`), seeded, driven through the generated
//! tonic client; each scenario reported beside the ceilings measured in the
//! same run. BENCHMARKS.md has the method and the latest results.
//!
//! Run without `--bench` (`cargo test --bench load`, as CI does) it is a
//! smoke run with tiny settings that fails if any scenario fails a call.

// A harness, not a library: nothing here is exported. `pub` in its private
// modules is how they share items, and docs go where a reader needs them,
// not on every item.
#![allow(unreachable_pub, missing_docs)]

mod capacity;
mod drive;
mod feed;
mod mesh;
mod report;
mod scenarios;
mod seed;
mod server;

use std::time::Duration;

use identity::{config::Config, db, hashing};

use crate::{
    report::{Row, SizeResult},
    scenarios::Bench,
    seed::Seeded,
    server::{Scratch, Server},
};

/// The knobs, from the environment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// Seeded user counts, ascending: the scenarios run at each.
    pub sizes: Vec<usize>,
    pub warmup_seconds: f64,
    pub seconds: f64,
    /// HTTP/2 connections from the client.
    pub connections: usize,
    /// Calls in flight at once (per side in the mixed scenario).
    pub in_flight: usize,
    /// Users logged in at each size, whose tokens VerifyToken checks.
    pub sessions: usize,
    /// Which scenarios and ceilings to run.
    pub scenarios: Vec<String>,
    /// A smoke run: tiny settings, any failed call fails the run.
    pub smoke: bool,
    /// Distinct live sessions `mesh_rss` verifies.
    pub rss_sessions: usize,
    /// Changes a second the writer of `mesh_writes` makes.
    pub writes_per_second: f64,
}

pub const ALL: [&str; 19] = [
    "capacity",
    "health",
    "db",
    "hashing",
    "jwt",
    "verify",
    "envoy",
    "mesh",
    "mesh_writes",
    "get_user",
    "get_self",
    "list_users",
    "refresh",
    "login",
    "flood",
    "feed",
    "feed_cost",
    "mesh_rss",
    "access_log",
];

impl Settings {
    fn from_env() -> Self {
        let smoke = !std::env::args().any(|a| a == "--bench");
        let num = |name: &str, default: f64| -> f64 {
            std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{name}: not a number: {v:?}"))
                })
                .unwrap_or(default)
        };
        let sizes: Vec<usize> = match std::env::var("BENCH_USERS") {
            Ok(v) => {
                let mut sizes: Vec<usize> = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .unwrap_or_else(|_| panic!("BENCH_USERS: not a count: {s:?}"))
                    })
                    .collect();
                sizes.sort_unstable();
                sizes
            }
            Err(_) if smoke => vec![200],
            Err(_) => vec![10_000],
        };
        assert!(sizes[0] >= 2, "BENCH_USERS: at least 2 users");
        let scenarios = match std::env::var("BENCH_SCENARIOS") {
            Ok(v) => v
                .split(',')
                .map(|s| {
                    let s = s.trim();
                    assert!(
                        ALL.contains(&s),
                        "BENCH_SCENARIOS: unknown {s:?}; known: {ALL:?}"
                    );
                    s.to_owned()
                })
                .collect(),
            Err(_) => ALL.iter().map(|s| (*s).to_owned()).collect(),
        };
        let (warmup, seconds, connections, in_flight, sessions) = if smoke {
            (0.3, 1.0, 2.0, 4.0, 8.0)
        } else {
            (2.0, 10.0, 4.0, 64.0, 512.0)
        };
        let sessions = (num("BENCH_SESSIONS", sessions) as usize).clamp(1, sizes[0] - 1);
        let in_flight = num("BENCH_IN_FLIGHT", in_flight).max(1.0) as usize;
        let sessions = sessions.max(in_flight.min(sizes[0] - 1));
        Self {
            sizes,
            warmup_seconds: num("BENCH_WARMUP", warmup),
            seconds: num("BENCH_SECONDS", seconds).max(0.1),
            connections: num("BENCH_CONNECTIONS", connections).max(1.0) as usize,
            in_flight,
            sessions,
            scenarios,
            smoke,
            rss_sessions: num("BENCH_RSS_SESSIONS", if smoke { 300.0 } else { 100_000.0 }).max(1.0)
                as usize,
            writes_per_second: num("BENCH_WRITES", 100.0).max(1.0),
        }
    }

    pub fn runs(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_seconds)
    }

    pub fn measure(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

fn main() {
    let settings = Settings::from_env();
    eprintln!("settings: {settings:?}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let failed = runtime.block_on(run(settings));
    if failed {
        std::process::exit(1);
    }
}

/// Runs everything; true if the smoke run saw a failure.
async fn run(settings: Settings) -> bool {
    let scratch = Scratch::new();
    let database_url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    // The settings the server reads from this same environment.
    let config = Config::from_args(Vec::<String>::new()).expect("the service's settings");
    let data_dir = scratch.0.join("data");
    let server = Server::start(&data_dir, &scratch.0.join("keys"), database_url.as_deref());
    let url = database_url.clone().unwrap_or_else(|| {
        db::embedded::running_cluster_url(&data_dir, "identity").expect("the embedded socket")
    });
    let pool = db::pool(&url, config.pool_size()).expect("a pool");
    scenarios::require_empty(&pool).await;

    let hash = hashing::Hasher::new(config.hash_params(), 1, 1)
        .expect("a hasher")
        .hash(&identity::domain::Password::unchecked(seed::PASSWORD))
        .await
        .expect("a hash");

    let mut bench =
        Bench::connect(&settings, &config, &server, (&url, &scratch.0), pool, hash).await;
    let mut seeded = Seeded::default();
    let mut results: Vec<SizeResult> = Vec::new();
    for &size in &settings.sizes {
        // The database before and after this seeding: `capacity` reports
        // its growth per user.
        let from_users = seeded.ids.len();
        let before = if settings.runs("capacity") {
            Some(capacity::DbSizes::read(&bench.pool).await)
        } else {
            None
        };
        seed::grow(&bench.pool, &mut seeded, size, &bench.hash).await;
        if let Some(before) = before {
            bench.seeding = Some(capacity::Seeding {
                from_users,
                before,
                after: capacity::DbSizes::read(&bench.pool).await,
            });
        }
        bench.log_in(&seeded).await;
        let mut rows: Vec<Row> = Vec::new();
        for scenario in ALL {
            if settings.runs(scenario) {
                eprintln!("[{size} users] {scenario}");
                rows.extend(bench.run(scenario, &seeded).await);
            }
        }
        let plan = if settings.runs("list_users") {
            bench.list_users_plan(&seeded).await
        } else {
            Vec::new()
        };
        results.push(SizeResult {
            users: size,
            rows,
            list_users_plan: plan,
            capacity: std::mem::take(&mut bench.figures),
        });
    }
    drop(bench);
    drop(server);
    report::print_and_save(&settings, &config, &results)
}
