//! The results: a table and the targets on stdout, the same as JSON under
//! `target/bench/`.

use std::{fmt::Write as _, path::PathBuf};

use identity::config::Config;
use serde_json::json;

use crate::{
    Settings,
    drive::Outcome,
    server::{CpuMark, CpuShares, Server},
};

/// One measured line.
pub struct Row {
    pub name: String,
    pub label: String,
    pub outcome: Outcome,
    /// The CPU of the server, the load generator and PostgreSQL over the
    /// scenario, each in % of one core.
    pub cpu: Option<CpuShares>,
    /// The server's peak resident set size over the scenario, in bytes.
    pub server_rss: Option<u64>,
    /// Lines printed under the row (and kept in the JSON).
    pub notes: Vec<String>,
}

impl Row {
    pub fn new(name: &str, label: &str, outcome: Outcome) -> Self {
        Self {
            name: name.into(),
            label: label.into(),
            outcome,
            cpu: None,
            server_rss: None,
            notes: Vec::new(),
        }
    }

    /// The CPU since `mark` and the server's peak memory.
    pub fn with_server(mut self, server: &Server, mark: &CpuMark) -> Self {
        self.cpu = Some(mark.shares(server));
        self.server_rss = Some(server.peak_rss());
        self
    }

    pub fn with_notes(mut self, notes: Vec<String>) -> Self {
        self.notes = notes;
        self
    }
}

/// A number for an operator (the `capacity` scenario): what, how much,
/// and how it was found.
pub struct Figure {
    pub what: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub detail: String,
}

impl Figure {
    pub fn new(what: impl Into<String>, value: Option<f64>, unit: &'static str) -> Self {
        Self {
            what: what.into(),
            value,
            unit,
            detail: String::new(),
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// Everything measured at one seeded size.
pub struct SizeResult {
    pub users: usize,
    pub rows: Vec<Row>,
    pub list_users_plan: Vec<String>,
    /// The `capacity` scenario's figures.
    pub capacity: Vec<Figure>,
}

impl SizeResult {
    fn get(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    fn rate(&self, name: &str) -> Option<f64> {
        self.get(name).map(|r| r.outcome.per_second())
    }
}

/// The ceiling each scenario is compared with.
fn ceiling_of(name: &str) -> Option<&'static str> {
    match name {
        "verify" | "get_user" | "refresh" => Some("db"),
        "list_users" | "envoy" | "get_self" => Some("health"),
        "login" | "flood_login" => Some("hashing"),
        "flood_verify" => Some("verify"),
        "h2_get_self_key" => Some("h2_get_self"),
        "h2_verify" | "h2_envoy" | "h2_get_self" | "h2_verify_off" | "h2_envoy_off"
        | "h2_get_self_off" | "h2_verify_writes" => Some("h2_health"),
        "update_feed" | "update_feed2" => Some("update_nofeed"),
        "create_feed" | "create_feed2" => Some("create_nofeed"),
        "cap_login_h2" => Some("cap_login_h1"),
        "cap_verify_off" => Some("cap_verify"),
        _ => None,
    }
}

struct Target {
    what: String,
    value: Option<f64>,
    limit: f64,
    at_least: bool,
}

impl Target {
    fn met(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_least {
                v >= self.limit
            } else {
                v <= self.limit
            }
        })
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn targets(config: &Config, results: &[SizeResult]) -> Vec<Target> {
    let mut out = Vec::new();
    let rss_limit =
        64.0 + config.hash_concurrency() as f64 * config.argon2_memory_kib as f64 / 1024.0;
    for r in results {
        let n = r.users;
        let p99 = |name: &str| r.get(name).map(|row| row.outcome.ms(0.99));
        out.push(Target {
            what: format!("{n} users: VerifyToken / database ceiling"),
            value: ratio(r.rate("verify"), r.rate("db")),
            limit: 0.5,
            at_least: true,
        });
        // Issue #15's bars, measured with h2load (the `mesh` scenarios).
        for (name, what, limit) in [
            ("h2_verify", "VerifyToken / Health/Check (cache on)", 0.5),
            (
                "h2_verify_off",
                "VerifyToken / Health/Check (cache off; 0.13 before the cache)",
                0.13,
            ),
            ("h2_envoy", "Envoy Check / Health/Check", 0.4),
            ("h2_get_self", "GetUser as the caller / Health/Check", 0.4),
            (
                "h2_verify_writes",
                "VerifyToken under 100 writes/s / Health/Check",
                0.3,
            ),
        ] {
            out.push(Target {
                what: format!("{n} users: {what} (h2load)"),
                value: ratio(r.rate(name), r.rate("h2_health")),
                limit,
                at_least: true,
            });
        }
        out.push(Target {
            what: format!("{n} users: GetUser by API key / by access token (h2load)"),
            value: ratio(r.rate("h2_get_self_key"), r.rate("h2_get_self")),
            limit: 0.9,
            at_least: true,
        });
        out.push(Target {
            what: format!("{n} users: answers staler than the guarantee, under 100 writes/s"),
            value: r.get("stale").map(|row| {
                row.outcome
                    .errors
                    .iter()
                    .filter(|(k, _)| k.starts_with("STALE"))
                    .fold(0.0, |sum, (_, v)| sum + *v as f64)
            }),
            limit: 0.0,
            at_least: false,
        });
        out.push(Target {
            what: format!("{n} users: peak RSS, MiB, with 100,000 distinct live sessions verified"),
            value: r
                .get("mesh_rss")
                .and_then(|row| row.server_rss)
                .map(|b| b as f64 / 1048576.0),
            limit: 128.0,
            at_least: false,
        });
        let average = |names: [&str; 2]| match names.map(|name| r.rate(name)) {
            [Some(a), Some(b)] => Some((a + b) / 2.0),
            [a, b] => a.or(b),
        };
        out.push(Target {
            what: format!("{n} users: VerifyToken with ACCESS_LOG=on / off (h2load)"),
            value: ratio(
                average(["access_on", "access_on2"]),
                average(["access_off", "access_off2"]),
            ),
            limit: 0.9,
            at_least: true,
        });
        out.push(Target {
            what: format!("{n} users: GetUser / database ceiling"),
            value: ratio(r.rate("get_user"), r.rate("db")),
            limit: 0.5,
            at_least: true,
        });
        out.push(Target {
            what: format!("{n} users: Login / hashing ceiling"),
            value: ratio(r.rate("login"), r.rate("hashing")),
            limit: 0.9,
            at_least: true,
        });
        out.push(Target {
            what: format!("{n} users: VerifyToken under a login flood / alone (throughput)"),
            value: ratio(r.rate("flood_verify"), r.rate("verify")),
            limit: 0.5,
            at_least: true,
        });
        out.push(Target {
            what: format!("{n} users: VerifyToken under a login flood / alone (p99)"),
            value: ratio(p99("flood_verify"), p99("verify")),
            limit: 3.0,
            at_least: false,
        });
        let peak = r
            .rows
            .iter()
            .filter(|row| row.name != "mesh_rss")
            .filter_map(|row| row.server_rss)
            .max()
            .map(|b| b as f64 / 1048576.0);
        for (op, name) in [("UpdateUser", "update"), ("CreateUser", "create")] {
            let with = [
                r.rate(&format!("{name}_feed")),
                r.rate(&format!("{name}_feed2")),
            ];
            let with = match with {
                [Some(a), Some(b)] => Some((a + b) / 2.0),
                [a, b] => a.or(b),
            };
            out.push(Target {
                what: format!(
                    "{n} users: {op} with the change feed / without (mean of the runs with)"
                ),
                value: ratio(with, r.rate(&format!("{name}_nofeed"))),
                limit: 0.8,
                at_least: true,
            });
        }
        out.push(Target {
            what: format!("{n} users: change feed delivery delay p99, ms (commit to a watcher on another replica)"),
            value: p99("feed_delay"),
            limit: 100.0,
            at_least: false,
        });
        out.push(Target {
            what: format!("{n} users: change feed: writes not delivered exactly once, in order"),
            value: r
                .get("feed_delay")
                .map(|row| row.outcome.errors.values().sum::<u64>() as f64),
            limit: 0.0,
            at_least: false,
        });
        out.push(Target {
            what: format!("{n} users: peak RSS of the server, MiB (64 + hashing x argon2 memory)"),
            value: peak,
            limit: rss_limit,
            at_least: false,
        });
    }
    if let [first, .., last] = results {
        out.push(Target {
            what: format!(
                "VerifyToken at {} users / at {} users (throughput)",
                last.users, first.users
            ),
            value: ratio(last.rate("verify"), first.rate("verify")),
            limit: 0.9,
            at_least: true,
        });
    }
    if let Some(last) = results.last() {
        let p50 = |name: &str| last.get(name).map(|row| row.outcome.ms(0.5));
        out.push(Target {
            what: format!(
                "{} users: ListUsers query p50 / GetUser p50 (same order: at most 10)",
                last.users
            ),
            value: ratio(p50("list_users"), p50("get_user")),
            limit: 10.0,
            at_least: false,
        });
    }
    out
}

/// Prints the table and the targets, writes the JSON; true if this was a
/// smoke run and a call failed or a scenario made no call.
pub fn print_and_save(settings: &Settings, config: &Config, results: &[SizeResult]) -> bool {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<14} {:>8} {:>10} {:>7} {:>8} {:>8} {:>8}  {:<13} {:>6} {:>7} {:>7} {:>7} {:>8}",
        "scenario",
        "users",
        "ok/s",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "vs",
        "ratio",
        "srv CPU",
        "gen CPU",
        "pg CPU",
        "srv RSS"
    );
    let mut failed = false;
    let mut sizes_json = Vec::new();
    for r in results {
        let mut rows_json = Vec::new();
        for row in &r.rows {
            let o = &row.outcome;
            let errors: u64 = o.errors.values().sum();
            let ceiling = ceiling_of(&row.name);
            let vs = ratio(Some(o.per_second()), ceiling.and_then(|c| r.rate(c)));
            let _ = writeln!(
                out,
                "{:<14} {:>8} {:>10.1} {:>7} {:>8.2} {:>8.2} {:>8.2}  {:<13} {:>6} {:>7} {:>7} {:>7} {:>8}",
                row.name,
                r.users,
                o.per_second(),
                errors,
                o.ms(0.5),
                o.ms(0.9),
                o.ms(0.99),
                ceiling.unwrap_or("-"),
                vs.map_or("-".into(), |v| format!("{v:.2}")),
                percent(row.cpu.map(|c| c.server)),
                percent(row.cpu.map(|c| c.generator)),
                percent(row.cpu.and_then(|c| c.postgres)),
                row.server_rss
                    .map_or("-".into(), |b| format!("{:.1}M", b as f64 / 1048576.0)),
            );
            if !o.errors.is_empty() {
                let _ = writeln!(out, "{:<14}   errors: {:?}", "", o.errors);
            }
            for note in &row.notes {
                let _ = writeln!(out, "{:<14}   {note}", "");
            }
            if settings.smoke && (o.ok == 0 || errors > 0) {
                failed = true;
            }
            rows_json.push(json!({
                "scenario": row.name,
                "label": row.label,
                "ok": o.ok,
                "seconds": o.seconds,
                "per_second": o.per_second(),
                "errors": o.errors,
                "latency_ms": {
                    "p50": o.ms(0.5), "p90": o.ms(0.9), "p99": o.ms(0.99),
                    "p999": o.ms(0.999), "max": o.latency.max() as f64 / 1000.0,
                    "mean": o.latency.mean() / 1000.0,
                },
                "ceiling": ceiling,
                "ratio_to_ceiling": vs,
                "server_cpu_percent": row.cpu.map(|c| c.server),
                "generator_cpu_percent": row.cpu.map(|c| c.generator),
                "postgres_cpu_percent": row.cpu.and_then(|c| c.postgres),
                "server_peak_rss_bytes": row.server_rss,
                "notes": row.notes,
            }));
        }
        let capacity_json: Vec<_> = r
            .capacity
            .iter()
            .map(|f| json!({"what": f.what, "value": f.value, "unit": f.unit, "detail": f.detail}))
            .collect();
        sizes_json.push(json!({
            "users": r.users,
            "scenarios": rows_json,
            "list_users_plan": r.list_users_plan,
            "capacity": capacity_json,
        }));
    }
    let targets = targets(config, results);
    let _ = writeln!(out, "\ntargets (ratios from this run):");
    let mut targets_json = Vec::new();
    for t in &targets {
        let verdict = match t.met() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not run",
        };
        let _ = writeln!(
            out,
            "  {:<78} {:>8} {} {:<6} {verdict}",
            t.what,
            t.value.map_or("-".into(), |v| format!("{v:.2}")),
            if t.at_least { ">=" } else { "<=" },
            t.limit,
        );
        targets_json.push(json!({
            "target": t.what, "value": t.value, "limit": t.limit,
            "at_least": t.at_least, "met": t.met(),
        }));
    }
    for r in results.iter().filter(|r| !r.capacity.is_empty()) {
        let machine = machine();
        let _ = writeln!(
            out,
            "\ncapacity at {} users ({} cores, {}; argon2id m={} KiB t={} p={}):",
            r.users,
            machine["cores"],
            machine["cpu"].as_str().unwrap_or("unknown CPU"),
            config.argon2_memory_kib,
            config.argon2_iterations,
            config.argon2_parallelism,
        );
        for f in &r.capacity {
            let _ = writeln!(
                out,
                "  {:<66} {:>10} {}",
                f.what,
                f.value.map_or("-".into(), |v| if f.unit == "x" {
                    format!("{v:.2}")
                } else {
                    format!("{v:.1}")
                }),
                f.unit
            );
            if !f.detail.is_empty() {
                let _ = writeln!(out, "      {}", f.detail);
            }
        }
    }
    for r in results {
        if !r.list_users_plan.is_empty() {
            let _ = writeln!(out, "\nListUsers query plan at {} users:", r.users);
            for line in &r.list_users_plan {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    print!("{out}");

    let report = json!({
        "commit": commit(),
        "time": chrono::Utc::now().to_rfc3339(),
        "machine": machine(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "settings": settings,
        "service": {
            "db_pool_size": config.pool_size(),
            "worker_threads": config.worker_threads(),
            "hash_concurrency": config.hash_concurrency(),
            "hash_queue": config.hash_queue,
            "argon2": {
                "memory_kib": config.argon2_memory_kib,
                "iterations": config.argon2_iterations,
                "parallelism": config.argon2_parallelism,
            },
            "jwt_algorithm": format!("{:?}", config.jwt_algorithm),
        },
        "sizes": sizes_json,
        "targets": targets_json,
    });
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let text = serde_json::to_string_pretty(&report).expect("JSON");
    let name = if settings.smoke {
        "load-smoke.json"
    } else {
        "load-latest.json"
    };
    std::fs::write(dir.join(name), &text).expect("write the report");
    if !settings.smoke {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        std::fs::write(dir.join(format!("load-{stamp}.json")), &text).expect("write the report");
    }
    println!("\nwritten: {}", dir.join(name).display());
    if failed {
        eprintln!("smoke run: a scenario failed calls or made none");
    }
    failed
}

fn percent(share: Option<f64>) -> String {
    share.map_or("-".into(), |c| format!("{c:.0}%"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    json!({
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu": model,
        "memory_gib": mem_kib.map(|k| k as f64 / 1048576.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
    })
}
