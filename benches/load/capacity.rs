//! `capacity` (issue #19): the numbers an operator sizes a deployment
//! from, each measured here rather than derived.
//!
//! - Memory at rest: this server's VmRSS when it said it was ready (empty
//!   database, no call yet) and now; a fresh replica's on the seeded
//!   database, one second after it is ready.
//! - Per hashing thread: a login flood (`BENCH_IN_FLIGHT` Login calls in
//!   flight, random seeded users) on a replica with `HASH_CONCURRENCY=1`,
//!   then on one with `=2`, one at a time: logins per second, the replica's
//!   CPU, and its peak RSS (VmHWM) against `ARGON2_MEMORY_KIB`.
//! - VerifyToken per core: h2load (light: its CPU is reported) against this
//!   server (verification cache on, one token), then against a replica
//!   with `VERIFY_CACHE=off` (a database read per call); calls per second
//!   divided by the server's CPU seconds per second, and by the server's
//!   and PostgreSQL's together.
//! - Database growth: `pg_total_relation_size` (heap, indexes, TOAST and
//!   their forks) of every table, and `pg_database_size`, before and after
//!   the seeding of this size (per user), and before and after the floods'
//!   logins (per session; the login throttle's tables, whose rows each
//!   Login deletes as it ends, shown apart), with the change feed's rows
//!   each adds.

use std::collections::BTreeMap;

use diesel::{
    QueryableByName,
    sql_types::{BigInt, Text},
};
use diesel_async::RunQueryDsl;
use identity::db::Pool;

use crate::{
    drive,
    mesh::h2load_found,
    report::{Figure, Row},
    scenarios::{Bench, login_call_on},
    seed::Seeded,
    server::{CpuMark, Server},
};

/// One table's size on disk, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct TableSize {
    /// Heap, indexes, TOAST, and their free-space and visibility maps.
    total: i64,
    indexes: i64,
}

/// The database's size, table by table, and the rows that grow it.
#[derive(Debug, Clone, Default)]
pub struct DbSizes {
    database: i64,
    tables: BTreeMap<String, TableSize>,
    users: i64,
    sessions: i64,
    changes: i64,
}

/// The database before and after one seeding.
pub struct Seeding {
    pub from_users: usize,
    pub before: DbSizes,
    pub after: DbSizes,
}

impl DbSizes {
    pub async fn read(pool: &Pool) -> Self {
        #[derive(QueryableByName)]
        struct Table {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = BigInt)]
            total: i64,
            #[diesel(sql_type = BigInt)]
            indexes: i64,
        }
        #[derive(QueryableByName)]
        struct Counts {
            #[diesel(sql_type = BigInt)]
            database: i64,
            #[diesel(sql_type = BigInt)]
            users: i64,
            #[diesel(sql_type = BigInt)]
            sessions: i64,
            #[diesel(sql_type = BigInt)]
            changes: i64,
        }
        let mut conn = pool.get().await.expect("a connection");
        let tables: Vec<Table> = diesel::sql_query(
            "SELECT c.relname::text AS name, pg_total_relation_size(c.oid) AS total, \
             pg_indexes_size(c.oid) AS indexes \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind = 'r'",
        )
        .load(&mut conn)
        .await
        .expect("table sizes");
        let counts: Counts = diesel::sql_query(
            "SELECT pg_database_size(current_database()) AS database, \
             (SELECT count(*) FROM users) AS users, \
             (SELECT count(*) FROM sessions) AS sessions, \
             (SELECT count(*) FROM changes) AS changes",
        )
        .get_result(&mut conn)
        .await
        .expect("row counts");
        Self {
            database: counts.database,
            tables: tables
                .into_iter()
                .map(|t| {
                    let size = TableSize {
                        total: t.total,
                        indexes: t.indexes,
                    };
                    (t.name, size)
                })
                .collect(),
            users: counts.users,
            sessions: counts.sessions,
            changes: counts.changes,
        }
    }

    /// Bytes per `per` added since `before` to the tables `keep` accepts,
    /// and a description: those tables largest first (each with its
    /// indexes' share), pg_database_size per `per`, and the growth of the
    /// other tables, in all.
    fn growth(
        &self,
        before: &Self,
        per: i64,
        keep: impl Fn(&str) -> bool,
    ) -> (Option<f64>, String) {
        if per <= 0 {
            return (None, "nothing added".into());
        }
        let per_f = per as f64;
        let mut grew: Vec<(&str, i64, i64)> = self
            .tables
            .iter()
            .map(|(name, after)| {
                let was = before.tables.get(name).copied().unwrap_or_default();
                (
                    name.as_str(),
                    after.total - was.total,
                    after.indexes - was.indexes,
                )
            })
            .filter(|(_, total, _)| *total != 0)
            .collect();
        grew.sort_by_key(|(_, total, _)| -total);
        let (kept, others): (Vec<_>, Vec<_>) = grew.into_iter().partition(|(name, ..)| keep(name));
        let all: i64 = kept.iter().map(|(_, total, _)| total).sum();
        let tables: Vec<String> = kept
            .iter()
            .filter(|(_, total, _)| (*total as f64 / per_f).abs() >= 0.5)
            .map(|(name, total, indexes)| {
                format!(
                    "{name} {:.0} B (indexes {:.0})",
                    *total as f64 / per_f,
                    *indexes as f64 / per_f
                )
            })
            .collect();
        let others: Vec<String> = others
            .iter()
            .map(|(name, total, _)| format!("{name} {:.0} KiB", *total as f64 / 1024.0))
            .collect();
        (
            Some(all as f64 / per_f),
            format!(
                "{}; pg_database_size {:.0} B{}",
                tables.join(", "),
                (self.database - before.database) as f64 / per_f,
                if others.is_empty() {
                    String::new()
                } else {
                    format!("; not counted, in all: {}", others.join(", "))
                }
            ),
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

impl Bench<'_> {
    pub async fn capacity(&mut self, seeded: &Seeded) -> Vec<Row> {
        let users = seeded.ids.len();
        let mut figures = Vec::new();
        let mut rows = Vec::new();

        figures.push(
            Figure::new(
                "memory at rest: this server when ready, empty database",
                Some(mib(self.server.rss_at_start)),
                "MiB",
            )
            .detail(format!(
                "VmRSS; HASH_CONCURRENCY={}, argon2 memory kept per hashing thread",
                self.config.hash_concurrency()
            )),
        );
        figures.push(
            Figure::new(
                "memory at rest: this server now, no call running",
                Some(mib(self.server.rss())),
                "MiB",
            )
            .detail(format!(
                "VmRSS after {users} users seeded and {} logged in (and any scenario before this one)",
                self.sessions().len()
            )),
        );

        if let Some(seeding) = &self.seeding {
            let added = seeding.after.users - seeding.before.users;
            let (bytes, detail) = seeding.after.growth(&seeding.before, added, |_| true);
            let changes = seeding.after.changes - seeding.before.changes;
            figures.push(
                Figure::new("database growth per user", bytes, "bytes").detail(format!(
                    "seeding {} -> {} users (bulk inserts, then VACUUM ANALYZE): {detail}",
                    seeding.from_users,
                    seeding.from_users as i64 + added
                )),
            );
            figures.push(
                Figure::new(
                    "change feed rows per user",
                    (added > 0).then(|| changes as f64 / added as f64),
                    "rows",
                )
                .detail("USER_CREATED and one MEMBER_ADDED per group (seeded users are in two)"),
            );
            let grown = |name: &str| {
                let size = |s: &DbSizes| s.tables.get(name).map_or(0, |t| t.total);
                size(&seeding.after) - size(&seeding.before)
            };
            figures.push(Figure::new(
                "bytes per change feed row (table and indexes)",
                (changes > 0).then(|| grown("changes") as f64 / changes as f64),
                "bytes",
            ));
        }

        // The floods open sessions through Login: the database's growth per
        // session is measured across them.
        let before_floods = DbSizes::read(&self.pool).await;
        let mut floods: Vec<(usize, Row, u64)> = Vec::new();
        for threads in [1usize, 2] {
            let envs: &'static [(&'static str, &'static str)] = if threads == 1 {
                &[("HASH_CONCURRENCY", "1")]
            } else {
                &[("HASH_CONCURRENCY", "2")]
            };
            let replica = self
                .replica(&format!("capacity-hash-{threads}"), envs)
                .await;
            // Not a wait for readiness (the replica said it was ready): its
            // background tasks (feed, health probe) make their first
            // connections just after.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let at_rest = replica.rss();
            let row = self
                .login_flood(
                    &replica,
                    &format!("cap_login_h{threads}"),
                    &format!("Login flood, HASH_CONCURRENCY={threads}"),
                    users,
                )
                .await;
            floods.push((threads, row, at_rest));
            tokio::task::spawn_blocking(move || drop(replica))
                .await
                .expect("the replica stops");
        }
        let after_floods = DbSizes::read(&self.pool).await;

        let argon2_mib = self.config.argon2_memory_kib as f64 / 1024.0;
        for (threads, row, at_rest) in &floods {
            let rate = row.outcome.per_second();
            let cpu = row.cpu.map_or(0.0, |c| c.server);
            figures.push(
                Figure::new(
                    format!("memory at rest: a replica when ready, {users} users, HASH_CONCURRENCY={threads}"),
                    Some(mib(*at_rest)),
                    "MiB",
                )
                .detail("VmRSS one second after its ready line, before any call"),
            );
            figures.push(
                Figure::new(
                    format!("peak memory under a login flood, HASH_CONCURRENCY={threads}"),
                    row.server_rss.map(mib),
                    "MiB",
                )
                .detail(format!(
                    "VmHWM over the flood, {} calls in flight",
                    self.settings.in_flight
                )),
            );
            figures.push(
                Figure::new(
                    format!("logins per second per hashing thread, HASH_CONCURRENCY={threads}"),
                    Some(rate / *threads as f64),
                    "logins/s",
                )
                .detail(format!(
                    "{rate:.1} logins/s in all; the replica at {cpu:.0}% of one core, \
                     {:.1} logins per second per core it used",
                    rate / (cpu / 100.0).max(1e-9)
                )),
            );
        }
        if let [(_, one, rest_one), (_, two, rest_two)] = &floods[..] {
            let peak = |row: &Row| row.server_rss.map(mib);
            figures.push(
                Figure::new(
                    "memory per hashing thread (peak, HASH_CONCURRENCY 2 - 1)",
                    peak(two).zip(peak(one)).map(|(two, one)| two - one),
                    "MiB",
                )
                .detail(format!(
                    "at rest: {:.1} MiB (2 - 1); ARGON2_MEMORY_KIB is {argon2_mib:.1} MiB",
                    mib(*rest_two) - mib(*rest_one)
                )),
            );
            figures.push(Figure::new(
                "logins per second, HASH_CONCURRENCY 2 / 1",
                (one.outcome.per_second() > 0.0)
                    .then(|| two.outcome.per_second() / one.outcome.per_second()),
                "x",
            ));
        }
        let sessions = after_floods.sessions - before_floods.sessions;
        // A Login also writes a lease (login_attempts) and a counter
        // (login_failures), both deleted when it ends: their dead rows are
        // space autovacuum reuses, as large as the logins under way, not
        // growth per session. They are shown, not counted.
        let (bytes, detail) = after_floods.growth(&before_floods, sessions, |t| {
            !matches!(t, "login_attempts" | "login_failures")
        });
        figures.push(
            Figure::new("database growth per session (a Login)", bytes, "bytes").detail(format!(
                "{sessions} sessions opened by the floods' logins: {detail}"
            )),
        );
        figures.push(Figure::new(
            "change feed rows per session",
            (sessions > 0)
                .then(|| (after_floods.changes - before_floods.changes) as f64 / sessions as f64),
            "rows",
        ));
        rows.extend(floods.into_iter().map(|(_, row, _)| row));

        if h2load_found() {
            let (_, _, verify) = self.unaries().into_iter().nth(1).expect("VerifyToken");
            let on = self
                .h2_with_postgres(
                    self.server,
                    ("cap_verify", "VerifyToken, cache on (h2load)"),
                    verify.clone(),
                )
                .await;
            let off_replica = self
                .replica("capacity-cache-off", &[("VERIFY_CACHE", "off")])
                .await;
            let off = self
                .h2_with_postgres(
                    &off_replica,
                    ("cap_verify_off", "VerifyToken, VERIFY_CACHE=off (h2load)"),
                    verify,
                )
                .await;
            tokio::task::spawn_blocking(move || drop(off_replica))
                .await
                .expect("the replica stops");
            for (row, cache) in [(&on, "on"), (&off, "off")] {
                let rate = row.outcome.per_second();
                let cpu = row.cpu.unwrap_or_default();
                let pg = cpu.postgres.unwrap_or(0.0);
                let per = |share: f64| Some(rate / (share / 100.0).max(1e-9));
                figures.push(
                    Figure::new(
                        format!("VerifyToken calls per core of the server, cache {cache}"),
                        per(cpu.server),
                        "calls/s",
                    )
                    .detail(format!(
                        "{rate:.0} calls/s, the server at {:.0}% of one core, PostgreSQL {pg:.0}%, \
                         the load generator (h2load and this harness) {:.0}%",
                        cpu.server, cpu.generator
                    )),
                );
                figures.push(Figure::new(
                    format!("VerifyToken calls per core of server and PostgreSQL, cache {cache}"),
                    per(cpu.server + pg),
                    "calls/s",
                ));
            }
            rows.push(on);
            rows.push(off);
        } else {
            assert!(
                self.settings.smoke,
                "the capacity scenario needs h2load: apt-get install nghttp2-client"
            );
            eprintln!("h2load not found: VerifyToken per core skipped");
        }
        self.figures.extend(figures);
        rows
    }

    /// `BENCH_IN_FLIGHT` Login calls against `server` over connections of
    /// their own; the CPU and peak memory are that server's.
    async fn login_flood(&self, server: &Server, name: &str, label: &str, users: usize) -> Row {
        let url = format!("http://{}", server.addr);
        let mut channels = Vec::new();
        for _ in 0..self.settings.connections {
            channels.push(
                tonic::transport::Endpoint::from_shared(url.clone())
                    .expect("a URL")
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .expect("connect to the replica"),
            );
        }
        let calls = (0..self.settings.in_flight)
            .map(|w| login_call_on(channels[w % channels.len()].clone(), w, users))
            .collect();
        server.reset_peak_rss();
        let mark = CpuMark::now(self.server);
        let server_before = server.cpu_seconds();
        let outcome = drive::drive(calls, self.window()).await;
        let mut shares = mark.shares(self.server);
        shares.server = mark.server_share(server, server_before);
        let mut row = Row::new(name, label, outcome);
        row.cpu = Some(shares);
        row.server_rss = Some(server.peak_rss());
        row
    }

    /// h2load against `server`, with PostgreSQL's CPU over the run even
    /// when `server` is a replica (the cluster is this server's).
    async fn h2_with_postgres(
        &self,
        server: &Server,
        names: (&str, &str),
        unary: crate::mesh::Unary,
    ) -> Row {
        let mark = CpuMark::now(self.server);
        let mut row = self.h2(server, names, unary, self.window()).await;
        if let Some(cpu) = row.cpu.as_mut()
            && cpu.postgres.is_none()
        {
            cpu.postgres = mark.shares(self.server).postgres;
        }
        row
    }
}
