//! The change feed (issue #14) under load. `feed`: how long a committed
//! change takes to reach a watcher on another replica (a second `identity
//! serve` on the same database) while replica A takes writes, and whether
//! every write arrives exactly once, in order. `feed_cost`: what recording
//! the feed costs the writes, the same writes with the feed's triggers on,
//! off, and on again, in one run.

use std::{
    collections::{BTreeSet, HashMap},
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use futures::FutureExt;
use hdrhistogram::Histogram;
use identity::{
    domain::Cursor,
    proto::identity::v1::{
        self as pb, change_service_client::ChangeServiceClient,
        user_service_client::UserServiceClient,
    },
};
use tonic::{Request, transport::Endpoint};
use uuid::Uuid;

use crate::{
    drive::{self, Call, Outcome, Rng, Window, code},
    report::Row,
    scenarios::Bench,
    seed,
    server::{CpuMark, Server},
};

/// Numbers every value a write sets, across the run, so that no write is
/// a no-op (the triggers record only what changed) and no name repeats.
static WRITES: AtomicU64 = AtomicU64::new(0);

/// How long the watcher may take to catch up with the head of the feed
/// once the writes stop.
const DRAIN: Duration = Duration::from_secs(10);

/// Successful UpdateUser calls, by user.
type Written = Arc<Mutex<HashMap<Uuid, u64>>>;

/// What the watcher on replica B saw.
struct Tally {
    /// From commit to receipt, in µs, of the changes committed in the
    /// window.
    delay: Histogram<u64>,
    in_window: u64,
    received: u64,
    /// USER_UPDATED changes, by user.
    updated: HashMap<Uuid, u64>,
    /// Changes whose cursor was not after the one before them.
    out_of_order: u64,
    last: Option<Cursor>,
}

impl Tally {
    fn new() -> Self {
        Self {
            delay: drive::histogram(),
            in_window: 0,
            received: 0,
            updated: HashMap::new(),
            out_of_order: 0,
            last: None,
        }
    }

    /// Counts one response received at `now`; delays of changes committed
    /// in `[from, end)`.
    fn add(&mut self, response: &pb::WatchChangesResponse, now: DateTime<Utc>, window: Wall) {
        for change in &response.changes {
            self.received += 1;
            match Cursor::parse(&change.cursor) {
                Ok(cursor) if self.last.is_none_or(|last| cursor > last) => {
                    self.last = Some(cursor);
                }
                _ => self.out_of_order += 1,
            }
            if change.kind == pb::ChangeKind::UserUpdated as i32
                && let Ok(user) = change.user_id.parse()
            {
                *self.updated.entry(user).or_default() += 1;
            }
            let commit = change
                .commit_time
                .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32));
            if let Some(commit) = commit
                && commit >= window.from
                && commit < window.end
            {
                // Both clocks are this machine's wall clock.
                let micros = (now - commit).num_microseconds().unwrap_or(i64::MAX);
                self.delay.saturating_record(micros.max(1) as u64);
                self.in_window += 1;
            }
        }
    }
}

/// A window on the wall clock (the clock of `commit_time`).
#[derive(Debug, Clone, Copy)]
struct Wall {
    from: DateTime<Utc>,
    end: DateTime<Utc>,
}

impl Wall {
    fn of(window: &Window) -> Self {
        let (now, instant) = (Utc::now(), Instant::now());
        let at = |i: Instant| {
            now + chrono::Duration::from_std(i.saturating_duration_since(instant))
                .unwrap_or_default()
        };
        Self {
            from: at(window.from),
            end: at(window.end),
        }
    }
}

#[derive(diesel::QueryableByName)]
struct Trigger {
    #[diesel(sql_type = Text)]
    table: String,
    #[diesel(sql_type = Text)]
    name: String,
}

impl Bench<'_> {
    /// The feed's windows: the others' in a real run, shorter in a smoke
    /// run, which only proves that the scenarios work.
    fn feed_window(&self) -> Window {
        if self.settings.smoke {
            Window::after(Duration::from_millis(50), Duration::from_millis(250))
        } else {
            self.window()
        }
    }

    /// `feed`: UpdateUser of random seeded users on replica A, watched
    /// through WatchChanges (all kinds, from now) on replica B.
    pub async fn feed(&self, ids: &Arc<Vec<Uuid>>) -> Vec<Row> {
        let triggers = self.feed_triggers().await;
        self.set_triggers(&triggers, true).await;
        let replica = {
            let (dir, keys, url) = (
                self.scratch.join("replica"),
                self.keys_dir.clone(),
                self.database_url.clone(),
            );
            tokio::task::spawn_blocking(move || Server::start(&dir, &keys, Some(&url)))
                .await
                .expect("replica B starts")
        };
        let channel = Endpoint::from_shared(format!("http://{}", replica.addr))
            .expect("a URL")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to replica B");
        let mut request = Request::new(pb::WatchChangesRequest::default());
        request
            .metadata_mut()
            .insert("authorization", self.admin.clone());
        let mut stream = ChangeServiceClient::new(channel.clone())
            .watch_changes(request)
            .await
            .expect("WatchChanges on replica B")
            .into_inner();
        // The first response comes at once: from here on the stream
        // stands at the head, and every write below is after it.
        stream
            .message()
            .await
            .expect("WatchChanges answers")
            .expect("a first response");

        let window = self.feed_window();
        let wall = Wall::of(&window);
        let tally = Arc::new(Mutex::new(Tally::new()));
        let (seen_tx, mut seen) = tokio::sync::watch::channel(0i64);
        let watcher = tokio::spawn({
            let tally = tally.clone();
            async move {
                loop {
                    let response = match stream.message().await {
                        Ok(Some(response)) => response,
                        Ok(None) => return "STREAM_ENDED".to_owned(),
                        Err(status) => return format!("WATCH_{}", code(status)),
                    };
                    let now = Utc::now();
                    tally.lock().expect("unpoisoned").add(&response, now, wall);
                    if let Ok(cursor) = Cursor::parse(&response.cursor) {
                        seen_tx.send_replace(cursor.xid);
                    }
                }
            }
        });

        let written: Written = Arc::default();
        let calls = (0..self.settings.in_flight)
            .map(|w| self.update_call(w, ids.clone(), Some(written.clone())))
            .collect();
        self.server.reset_peak_rss();
        let mark = CpuMark::now(self.server);
        let replica_before = replica.cpu_seconds();
        let writes = drive::drive(calls, window).await;
        let shares = mark.shares(self.server);
        let replica_share = mark.server_share(&replica, replica_before);
        let write_row = Row::new("feed_write", "UpdateUser on A, watched on B", writes)
            .with_server(self.server, &mark);

        // Every write has committed: wait until the watcher stands at the
        // head as it is now.
        let head = self.feed_head().await;
        let drained = tokio::time::timeout(DRAIN, seen.wait_for(|p| *p >= head))
            .await
            .is_ok_and(|r| r.is_ok());
        let ended = if watcher.is_finished() {
            Some(watcher.await.expect("the watcher task"))
        } else {
            watcher.abort();
            None
        };
        drop(channel);
        tokio::task::spawn_blocking(move || drop(replica))
            .await
            .expect("replica B stops");

        let tally = Arc::into_inner(tally)
            .expect("the watcher is gone")
            .into_inner()
            .expect("unpoisoned");
        let written = written.lock().expect("unpoisoned").clone();
        let users: BTreeSet<&Uuid> = written.keys().chain(tally.updated.keys()).collect();
        let (mut missing, mut extra) = (0u64, 0u64);
        for user in users {
            let w = written.get(user).copied().unwrap_or(0);
            let u = tally.updated.get(user).copied().unwrap_or(0);
            missing += w.saturating_sub(u);
            extra += u.saturating_sub(w);
        }
        let mut delay = Outcome::new(window.seconds());
        delay.ok = tally.in_window;
        delay.latency = tally.delay;
        for (label, n) in [
            ("UNDELIVERED", missing),
            ("EXTRA_CHANGE", extra),
            ("OUT_OF_ORDER", tally.out_of_order),
            ("NOT_DRAINED", u64::from(!drained)),
        ] {
            if n > 0 {
                delay.errors.insert(label.into(), n);
            }
        }
        if let Some(label) = ended {
            delay.errors.insert(label, 1);
        }
        let total: u64 = written.values().sum();
        let notes = vec![
            format!(
                "delay: {} changes committed in the window, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                delay.ok,
                delay.ms(0.5),
                delay.ms(0.99),
                delay.latency.max() as f64 / 1000.0,
            ),
            format!(
                "exactly once: {total} successful writes (warm-up included), {} USER_UPDATED \
                 changes for them, {missing} undelivered when the drain ended, {extra} extra, {} out of order, \
                 {} changes received in all",
                total - missing + extra,
                tally.out_of_order,
                tally.received,
            ),
            format!(
                "CPU, % of one core: load generator {:.0}%, replica A {:.0}%, replica B {:.0}%, \
                 PostgreSQL {}",
                shares.generator,
                shares.server,
                replica_share,
                shares.postgres.map_or("-".into(), |p| format!("{p:.0}%")),
            ),
        ];
        let mut delay_row = Row::new("feed_delay", "commit to watcher on B", delay);
        delay_row.cpu = Some(crate::server::CpuShares {
            server: replica_share,
            ..shares
        });
        vec![write_row, delay_row.with_notes(notes)]
    }

    /// `feed_cost`: UpdateUser, then CreateUser, each with the feed's
    /// triggers enabled, disabled, and enabled again, in windows of the
    /// same length.
    pub async fn feed_cost(&self, ids: &Arc<Vec<Uuid>>) -> Vec<Row> {
        let triggers = self.feed_triggers().await;
        self.set_triggers(&triggers, true).await;
        let n = self.settings.in_flight;
        let mut rows = Vec::new();
        for (op, label) in [("update", "UpdateUser"), ("create", "CreateUser")] {
            let calls = || -> Vec<Call> {
                (0..n)
                    .map(|w| match op {
                        "update" => self.update_call(w, ids.clone(), None),
                        _ => self.create_call(w),
                    })
                    .collect()
            };
            let with = format!("{label} with the feed");
            rows.push(
                self.measure_in(&format!("{op}_feed"), &with, calls(), self.feed_window())
                    .await,
            );
            self.set_triggers(&triggers, false).await;
            let without = AssertUnwindSafe(self.measure_in(
                &format!("{op}_nofeed"),
                &format!("{label} without the feed"),
                calls(),
                self.feed_window(),
            ))
            .catch_unwind()
            .await;
            // Enabled again whatever happened, before anything else runs.
            self.set_triggers(&triggers, true).await;
            rows.push(without.unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
            rows.push(
                self.measure_in(&format!("{op}_feed2"), &with, calls(), self.feed_window())
                    .await,
            );
        }
        let switched: Vec<String> = triggers
            .iter()
            .map(|t| format!("{}.{}", t.table, t.name))
            .collect();
        rows[0].notes = vec![
            format!("without the feed: disabled {}", switched.join(", ")),
            format!("cluster: {}", self.durability().await),
        ];
        rows
    }

    /// One UpdateUser of a random seeded user (not the superuser), as the
    /// superuser: a new first name, so that every call is a change.
    fn update_call(&self, w: usize, ids: Arc<Vec<Uuid>>, written: Option<Written>) -> Call {
        let client = UserServiceClient::new(self.channel(w));
        let admin = self.admin.clone();
        let mut rng = Rng::new(6000 + w as u64);
        Box::new(move || {
            let mut client = client.clone();
            let id = ids[1 + rng.below(ids.len() - 1)];
            let first_name = format!("Feed {}", WRITES.fetch_add(1, Ordering::Relaxed));
            let mut request = Request::new(pb::UpdateUserRequest {
                user: Some(pb::User {
                    id: id.to_string(),
                    first_name: first_name.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["first_name".into()],
                }),
            });
            request
                .metadata_mut()
                .insert("authorization", admin.clone());
            let written = written.clone();
            async move {
                let r = client
                    .update_user(request)
                    .await
                    .map_err(code)?
                    .into_inner();
                if r.user.is_none_or(|u| u.first_name != first_name) {
                    return Err("NOT_UPDATED".into());
                }
                if let Some(written) = written {
                    *written.lock().expect("unpoisoned").entry(id).or_default() += 1;
                }
                Ok(())
            }
            .boxed()
        })
    }

    /// One CreateUser of a new user, as the superuser (each an argon2id
    /// hash on the server).
    fn create_call(&self, w: usize) -> Call {
        let client = UserServiceClient::new(self.channel(w));
        let admin = self.admin.clone();
        Box::new(move || {
            let mut client = client.clone();
            let username = format!("feed.cost{}", WRITES.fetch_add(1, Ordering::Relaxed));
            let mut request = Request::new(pb::CreateUserRequest {
                username: username.clone(),
                email: format!("{username}@bench.example"),
                password: seed::PASSWORD.to_owned(),
                first_name: "Feed".into(),
                last_name: "Cost".into(),
                ..Default::default()
            });
            request
                .metadata_mut()
                .insert("authorization", admin.clone());
            async move {
                let r = client
                    .create_user(request)
                    .await
                    .map_err(code)?
                    .into_inner();
                match r.user {
                    Some(u) if u.username == username => Ok(()),
                    _ => Err("WRONG_USER".into()),
                }
            }
            .boxed()
        })
    }

    /// The triggers that record the feed: those whose function is one of
    /// the migration's `identity_*_changed` (users, sessions, groups,
    /// group_members).
    async fn feed_triggers(&self) -> Vec<Trigger> {
        let mut conn = self.pool.get().await.expect("a connection");
        let triggers: Vec<Trigger> = diesel::sql_query(
            "SELECT c.relname::text AS table, t.tgname::text AS name \
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE NOT t.tgisinternal AND p.proname LIKE 'identity\\_%\\_changed' \
             ORDER BY 1, 2",
        )
        .load(&mut conn)
        .await
        .expect("the feed's triggers");
        for known in ["users_changed", "users_updated", "sessions_started"] {
            assert!(
                triggers.iter().any(|t| t.name == known),
                "the feed's trigger {known} is missing"
            );
        }
        triggers
    }

    /// Enables or disables `triggers`, all in one transaction.
    async fn set_triggers(&self, triggers: &[Trigger], enabled: bool) {
        let verb = if enabled { "ENABLE" } else { "DISABLE" };
        let sql: String = triggers
            .iter()
            .map(|t| format!("ALTER TABLE \"{}\" {verb} TRIGGER \"{}\";", t.table, t.name))
            .collect();
        let mut conn = self.pool.get().await.expect("a connection");
        conn.batch_execute(&format!("BEGIN; {sql} COMMIT;"))
            .await
            .unwrap_or_else(|e| panic!("{verb} the feed's triggers: {e}"));
    }

    /// The transaction of the newest change in the feed: a watcher whose
    /// cursor reaches it has everything written so far.
    async fn feed_head(&self) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct Head {
            #[diesel(sql_type = BigInt)]
            position: i64,
        }
        let mut conn = self.pool.get().await.expect("a connection");
        diesel::sql_query(
            "SELECT COALESCE((SELECT xid::text::bigint FROM changes \
             ORDER BY xid DESC, seq DESC LIMIT 1), 0) AS position",
        )
        .get_result::<Head>(&mut conn)
        .await
        .expect("the head of the feed")
        .position
    }

    /// The cluster's settings that decide what a commit waits for.
    async fn durability(&self) -> String {
        #[derive(diesel::QueryableByName)]
        struct Line {
            #[diesel(sql_type = Text)]
            line: String,
        }
        let mut conn = self.pool.get().await.expect("a connection");
        diesel::sql_query(
            "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) AS line \
             FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', \
             'wal_sync_method', 'commit_delay', 'full_page_writes')",
        )
        .get_result::<Line>(&mut conn)
        .await
        .map(|l| l.line)
        .unwrap_or_else(|e| format!("unknown ({e})"))
    }
}
