//! The change feed's readers: ListChanges (the audit trail, paged by
//! cursor), WatchChanges (a stream that follows the feed as it commits),
//! the listener that wakes the watchers when any replica commits a change,
//! and the hourly purge of changes older than `CHANGES_RETENTION`.
//!
//! The feed is ordered by (transaction id, sequence) and read only below
//! the horizon (the snapshot's xmin: every transaction below it has ended),
//! so "everything after my cursor, below the horizon" never skips a change
//! (`migrations/*_changes/up.sql`, docs/changes.md). Every read is one
//! statement, which also returns the horizon of its snapshot. Commits are
//! announced by the replica that made them (the [`Announcer`]), after the
//! commit, and heard by every replica's listener.

use std::sync::Arc;
use std::time::Duration;

use super::fresh::FreshCache;
use crate::db::{self, Pool, changes::Filter};
use crate::domain::{Change, ChangeKind, Cursor};
use crate::error::{Error, Reason};
use futures::Stream;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::sync::watch;
use tokio::time::Instant;

/// The most changes in one ListChanges page.
pub const MAX_PAGE: i64 = 1000;
/// The page size when none is asked for.
pub const DEFAULT_PAGE: i64 = 100;
/// The most changes in one WatchChanges response.
const BATCH: i64 = 500;
/// How often a watcher reads the feed while no listener is connected.
const SLOW_POLL: Duration = Duration::from_millis(500);
/// How often the listener checks that its connection still answers.
const LISTENER_PING: Duration = Duration::from_secs(5);
/// The first wait before reading again when committed changes wait behind
/// a transaction still running (doubling up to [`SLOW_POLL`]).
const PENDING_RETRY: Duration = Duration::from_millis(2);
/// The longest ListChanges, or the start of a WatchChanges from now, waits
/// for changes already committed to pass the horizon.
const SETTLE: Duration = Duration::from_secs(1);

/// The feed's metrics, registered with the others by [`crate::metrics`].
#[derive(Clone, Debug)]
pub struct FeedMetrics {
    /// WatchChanges streams open now.
    pub watchers: IntGauge,
    /// Announcements of commits (from any replica), as heard by this one.
    pub commits: IntCounter,
    /// Changes sent to watchers, by kind.
    pub delivered: IntCounterVec,
    /// From a change's commit to its sending to a watcher.
    pub delay: Histogram,
    /// How far behind the furthest-behind open stream is, in seconds.
    pub lag: Gauge,
}

impl FeedMetrics {
    /// Creates the collectors (unregistered).
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            watchers: IntGauge::new("identity_change_streams", "WatchChanges streams open now.")?,
            commits: IntCounter::new(
                "identity_changes_written_total",
                "Announcements of committed changes (from any replica, one per burst of commits), \
                 as this replica's listener heard them.",
            )?,
            delivered: IntCounterVec::new(
                Opts::new(
                    "identity_changes_delivered_total",
                    "Changes sent to WatchChanges streams, by kind.",
                ),
                &["kind"],
            )?,
            delay: Histogram::with_opts(
                HistogramOpts::new(
                    "identity_change_delivery_seconds",
                    "From a change's commit to its sending on a WatchChanges stream.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            lag: Gauge::new(
                "identity_change_stream_lag_seconds",
                "How old the last change sent is on the open WatchChanges stream furthest behind \
                 (0 when every stream has caught up).",
            )?,
        })
    }

    /// Every collector, for registration.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.watchers.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.delivered.clone()),
            Box::new(self.delay.clone()),
            Box::new(self.lag.clone()),
        ]
    }
}

/// What the listener tells the watchers: bumped on every announcement
/// heard, and whether it is connected (when not, watchers poll).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Heard {
    commits: u64,
    pub(crate) listening: bool,
}

/// What follows a commit of this replica: the users it touched are
/// evicted from the verification cache (before the call answers), and the
/// commit is announced to every replica: one NOTIFY at a time, after the
/// commits, each covering all the commits made while the previous one was
/// under way. Writers never wait for the announcement.
#[derive(Debug, Clone, Default)]
pub struct Announcer {
    notify: Arc<tokio::sync::Notify>,
    cache: Option<FreshCache>,
}

impl Announcer {
    /// Asks for an announcement (returns at once).
    pub fn announce(&self) {
        self.notify.notify_one();
    }

    /// The verification cache that local commits evict from, if on.
    pub fn cache(&self) -> Option<&FreshCache> {
        self.cache.as_ref()
    }
}

/// ListChanges and WatchChanges.
#[derive(Clone)]
pub struct ChangeService {
    pool: Pool,
    heartbeat: Duration,
    heard: watch::Receiver<Heard>,
    heard_tx: Arc<watch::Sender<Heard>>,
    announcer: Announcer,
    metrics: FeedMetrics,
    lags: Arc<std::sync::Mutex<std::collections::HashMap<u64, f64>>>,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for ChangeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeService")
            .field("heartbeat", &self.heartbeat)
            .field("heard", &*self.heard.borrow())
            .finish_non_exhaustive()
    }
}

/// One page of ListChanges, or one response of WatchChanges.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The changes, in feed order.
    pub changes: Vec<Change>,
    /// Where the reader stands after them.
    pub cursor: Cursor,
}

impl ChangeService {
    /// Reads from `pool`; a watcher hears from the feed at least every
    /// `heartbeat`.
    pub fn new(pool: Pool, heartbeat: Duration, metrics: FeedMetrics) -> Self {
        let (tx, rx) = watch::channel(Heard::default());
        Self {
            pool,
            heartbeat,
            heard: rx,
            heard_tx: Arc::new(tx),
            announcer: Announcer::default(),
            metrics,
            lags: Arc::default(),
            next_stream: Arc::default(),
        }
    }

    /// This replica's announcer, for the calls that write.
    pub fn announcer(&self) -> Announcer {
        self.announcer.clone()
    }

    /// Local commits evict from `cache` before their calls answer.
    pub fn with_cache(mut self, cache: FreshCache) -> Self {
        self.announcer.cache = Some(cache);
        self
    }

    /// News of commits (announcements heard, the listener's state), for
    /// the verification cache's consumer.
    pub(crate) fn heard(&self) -> watch::Receiver<Heard> {
        self.heard.clone()
    }

    /// ListChanges: at most `page_size` changes after `after` (none: the
    /// oldest kept) that pass `filter`, and the cursor to go on from. A
    /// short page holds every change committed before the call, unless a
    /// transaction older than them runs on for more than a second (their
    /// place in the feed is not final until it ends).
    pub async fn list(
        &self,
        after: Option<Cursor>,
        filter: &Filter,
        page_size: i64,
    ) -> Result<Batch, Error> {
        let start = after.unwrap_or_default();
        let mut conn = db::conn(&self.pool).await?;
        let deadline = Instant::now() + SETTLE;
        let mut wait = PENDING_RETRY;
        let mut read = db::changes::read(&mut conn, start, filter, page_size).await?;
        // The newest change committed before the call: wait (briefly) until
        // it is final, so that the page holds it.
        let target = read.newest;
        while (read.changes.len() as i64) < page_size
            && target.is_some_and(|n| n >= read.horizon)
            && Instant::now() < deadline
        {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(SLOW_POLL);
            read = db::changes::read(&mut conn, start, filter, page_size).await?;
        }
        let start = match after {
            Some(cursor) => {
                check_cursor(cursor, &read)?;
                cursor
            }
            None => start.max(read.purged),
        };
        Ok(advance(start, read, page_size))
    }

    /// WatchChanges: a stream of batches after `after` (none: from now)
    /// that pass `kinds`. Its first response comes at once (the changes
    /// already after `after`, or a heartbeat); after that a response comes
    /// whenever changes commit, or a heartbeat at least every `heartbeat`.
    /// The stream reads the database only when polled, so a consumer that
    /// does not read makes the server read (and buffer) nothing. It ends
    /// with UNAVAILABLE when the database cannot be read by the time a
    /// heartbeat is due, and with FAILED_PRECONDITION CURSOR_EXPIRED when
    /// its cursor has been purged.
    pub async fn watch(
        &self,
        after: Option<Cursor>,
        kinds: Vec<ChangeKind>,
    ) -> Result<impl Stream<Item = Result<Batch, Error>> + Send + 'static, Error> {
        let filter = Filter {
            kinds,
            ..Filter::default()
        };
        // The start is checked now, so that a bad cursor fails the call
        // rather than its stream.
        let mut conn = db::conn(&self.pool).await?;
        let mut head = db::changes::head(&mut conn).await?;
        let cursor = match after {
            Some(cursor) => {
                check_cursor(cursor, &head)?;
                cursor
            }
            None => {
                // From now: after every change committed before the call,
                // once they are final (briefly waited for).
                let deadline = Instant::now() + SETTLE;
                let mut wait = PENDING_RETRY;
                let target = head.newest;
                while target.is_some_and(|n| n >= head.horizon) && Instant::now() < deadline {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(SLOW_POLL);
                    head = db::changes::head(&mut conn).await?;
                }
                Cursor::before(head.horizon)
            }
        };
        drop(conn);
        let id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut heard = self.heard.clone();
        heard.mark_unchanged();
        let watcher = Watcher {
            service: self.clone(),
            id,
            filter,
            cursor,
            heard,
            next_beat: Instant::now(),
            first: true,
            done: false,
            _open: Open::new(self, id),
        };
        Ok(futures::stream::unfold(watcher, |mut w| async move {
            if w.done {
                return None;
            }
            let item = w.next().await;
            w.done = item.is_err();
            Some((item, w))
        }))
    }

    /// Announces this replica's commits until `stopped`: wakes the local
    /// watchers at once, then NOTIFYs every replica's listener.
    pub async fn announce_commits(self, mut stopped: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.announcer.notify.notified() => {}
                _ = stopped.changed() => return,
            }
            self.heard_tx.send_modify(|h| h.commits += 1);
            let result = async {
                let mut conn = db::conn(&self.pool).await?;
                db::changes::announce(&mut conn).await
            }
            .await;
            if let Err(e) = result {
                // The other replicas' watchers poll while they hear nothing.
                tracing::debug!(error = %e, "a commit was not announced");
            }
        }
    }

    /// Listens for announcements on a connection of its own until
    /// `stopped`, waking the watchers on each; reconnects after a second
    /// when the connection is lost (the watchers poll meanwhile).
    pub async fn listen(self, database_url: String, mut stopped: watch::Receiver<bool>) {
        use futures::StreamExt;
        loop {
            if let Ok(mut conn) = db::changes::listen(&database_url).await {
                // Whatever committed while no one listened is read now.
                self.heard_tx.send_modify(|h| {
                    h.listening = true;
                    h.commits += 1;
                });
                let mut ping = tokio::time::interval(LISTENER_PING);
                ping.tick().await;
                loop {
                    enum Event {
                        Heard(bool),
                        Ping,
                    }
                    let event = tokio::select! {
                        heard = async {
                            let heard = conn.notifications_stream();
                            futures::pin_mut!(heard);
                            heard.next().await
                        } => Event::Heard(matches!(heard, Some(Ok(_)))),
                        _ = ping.tick() => Event::Ping,
                        _ = stopped.changed() => return,
                    };
                    let alive = match event {
                        Event::Heard(true) => {
                            self.metrics.commits.inc();
                            self.heard_tx.send_modify(|h| h.commits += 1);
                            true
                        }
                        Event::Heard(false) => false,
                        Event::Ping => {
                            tokio::time::timeout(LISTENER_PING, db::changes::ping(&mut conn))
                                .await
                                .is_ok_and(|r| r.is_ok())
                        }
                    };
                    if !alive {
                        break;
                    }
                }
                tracing::warn!("the change feed's listener lost its connection; watchers poll");
            }
            self.heard_tx.send_modify(|h| h.listening = false);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped.changed() => return,
            }
        }
    }

    fn update_lag(&self, id: u64, behind: Option<f64>) {
        let mut lags = self.lags.lock().unwrap_or_else(|p| p.into_inner());
        match behind {
            Some(b) => {
                lags.insert(id, b);
            }
            None => {
                lags.remove(&id);
            }
        }
        self.metrics
            .lag
            .set(lags.values().copied().fold(0.0, f64::max));
    }
}

/// The purge of changes recorded longer than `retention` ago; returns how
/// many went.
pub async fn purge(pool: &Pool, retention: Duration) -> Result<usize, Error> {
    let mut conn = db::conn(pool).await?;
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
    Ok(db::changes::purge(&mut conn, chrono::Utc::now() - retention).await?)
}

/// A cursor the feed can resume from: not purged, and not beyond every
/// transaction begun so far (a cursor of another database).
fn check_cursor(cursor: Cursor, read: &db::changes::Read) -> Result<(), Error> {
    if cursor < read.purged {
        return Err(Error::Refused {
            reason: Reason::CursorExpired,
            message: "the cursor is older than CHANGES_RETENTION, or from before a restore: start again from empty and re-read state",
        });
    }
    if cursor.xid >= read.xmax {
        return Err(Error::invalid(
            "after_cursor",
            "is ahead of the feed: not a cursor from this service's database",
        ));
    }
    Ok(())
}

/// The batch a read makes, and where its reader stands after it: after
/// the last change, or, when the read came back short (it saw everything
/// below the horizon), after the horizon, so that a filtered reader does
/// not scan the same unmatched changes again.
pub(crate) fn advance(start: Cursor, read: db::changes::Read, limit: i64) -> Batch {
    let full = read.changes.len() as i64 >= limit;
    let mut cursor = read.changes.last().map_or(start, |c| c.cursor);
    if !full {
        cursor = cursor.max(Cursor::before(read.horizon));
    }
    Batch {
        changes: read.changes,
        cursor,
    }
}

/// Counts a stream as open while it lives.
#[derive(Debug)]
struct Open {
    service: ChangeService,
    id: u64,
}

impl Open {
    fn new(service: &ChangeService, id: u64) -> Self {
        service.metrics.watchers.inc();
        Open {
            service: service.clone(),
            id,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.service.metrics.watchers.dec();
        self.service.update_lag(self.id, None);
    }
}

/// The state of one WatchChanges stream.
struct Watcher {
    service: ChangeService,
    id: u64,
    filter: Filter,
    cursor: Cursor,
    heard: watch::Receiver<Heard>,
    /// When a response is due even if nothing changed.
    next_beat: Instant,
    first: bool,
    done: bool,
    _open: Open,
}

impl Watcher {
    /// The next response: changes as soon as there are any, else a
    /// heartbeat when one is due.
    async fn next(&mut self) -> Result<Batch, Error> {
        let heartbeat = self.service.heartbeat;
        let mut retry = PENDING_RETRY;
        loop {
            // Marked seen before the read, so that a commit heard during
            // the read wakes the wait below instead of being lost.
            let listening = self.heard.borrow_and_update().listening;
            let pending;
            match self.read().await {
                Ok(read) => {
                    let full = read.changes.len() as i64 >= BATCH;
                    // Committed changes wait behind a transaction still
                    // running: read again soon, not at the next commit.
                    pending = !full && read.newest.is_some_and(|n| n >= read.horizon);
                    let batch = advance(self.cursor, read, BATCH);
                    self.cursor = batch.cursor;
                    let behind = match (full, batch.changes.last()) {
                        (true, Some(last)) => {
                            (chrono::Utc::now() - last.commit_time).num_milliseconds() as f64 / 1e3
                        }
                        _ => 0.0,
                    };
                    self.service.update_lag(self.id, Some(behind.max(0.0)));
                    if !batch.changes.is_empty() || self.first || Instant::now() >= self.next_beat {
                        self.first = false;
                        self.next_beat = Instant::now() + heartbeat;
                        self.delivered(&batch.changes);
                        return Ok(batch);
                    }
                }
                // The database is away: try again until a heartbeat is
                // due, then say so (a client trusts a stream that beats).
                Err(Error::Unavailable(_)) if Instant::now() < self.next_beat => {
                    tokio::time::sleep(SLOW_POLL.min(self.next_beat - Instant::now())).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let wait = if pending {
                let wait = retry;
                retry = (retry * 2).min(SLOW_POLL);
                wait
            } else {
                retry = PENDING_RETRY;
                if listening { heartbeat } else { SLOW_POLL }
            };
            tokio::select! {
                _ = self.heard.changed() => {}
                _ = tokio::time::sleep_until(self.next_beat) => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn read(&mut self) -> Result<db::changes::Read, Error> {
        let mut conn = db::conn(&self.service.pool).await?;
        let read = db::changes::read(&mut conn, self.cursor, &self.filter, BATCH).await?;
        check_cursor(self.cursor, &read)?;
        Ok(read)
    }

    fn delivered(&self, changes: &[Change]) {
        let now = chrono::Utc::now();
        let metrics = &self.service.metrics;
        for change in changes {
            metrics
                .delivered
                .with_label_values(&[change.kind.name()])
                .inc();
            let delay = (now - change.commit_time).num_microseconds().unwrap_or(0);
            metrics.delay.observe(delay.max(0) as f64 / 1e6);
        }
    }
}

/// Parses the kinds of a filter: each a known kind, none UNSPECIFIED.
pub fn kinds(numbers: &[i32]) -> Result<Vec<ChangeKind>, String> {
    numbers
        .iter()
        .map(|n| ChangeKind::from_number(*n).ok_or_else(|| format!("{n} is not a change kind")))
        .collect()
}
