//! The verification cache: what the token check reads (the user, the
//! session, the groups), kept in memory and kept true by the change feed,
//! behind VerifyToken, the Envoy check and the bearer check of every call
//! (`VERIFY_CACHE`).
//!
//! Its guarantees:
//! - a change committed through this replica is evicted before the call
//!   that made it answers (`audit` asks the transaction which users it
//!   touched, and evicts them once it has committed);
//! - a change committed elsewhere (another replica, SQL by hand) is evicted
//!   by the feed consumer here, which reads the feed after every
//!   announcement and at least every [`POLL`];
//! - the cache answers only while it is fresh: its consumer has read,
//!   within [`STALENESS`], a snapshot in which every committed change had
//!   been applied. Otherwise (the database away, the feed held back by an
//!   open transaction) every check reads the database;
//! - a read that raced an eviction is not kept: each read takes a ticket
//!   (the eviction count) before it starts, and its result is stored only
//!   if its user was not evicted since;
//! - at most `VERIFY_CACHE_SIZE` sessions are kept.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use super::changes::{Heard, advance};
use crate::db::{self, changes::Filter, sessions::Fresh};
use crate::domain::{Cursor, Group, User};

/// The longest the cache answers after its last complete read of the feed.
pub const STALENESS: Duration = Duration::from_millis(500);
/// How often the consumer reads the feed when nothing is announced.
pub const POLL: Duration = Duration::from_millis(100);
/// How many evictions are remembered for the tickets of reads under way.
const RECENT: usize = 4096;
/// The most changes the consumer reads at once.
const BATCH: i64 = 1000;

/// The cache's counters, registered with the other metrics.
#[derive(Clone, Debug)]
pub struct CacheMetrics {
    /// Checks answered from memory.
    pub hits: IntCounter,
    /// Checks that read the database (not cached, or the cache not fresh).
    pub misses: IntCounter,
    /// Sessions dropped because their user changed, or for room.
    pub evictions: IntCounter,
    /// Sessions kept now.
    pub entries: IntGauge,
}

impl CacheMetrics {
    /// Creates the collectors (unregistered).
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            hits: IntCounter::new(
                "identity_verify_cache_hits_total",
                "Token checks answered from the verification cache.",
            )?,
            misses: IntCounter::new(
                "identity_verify_cache_misses_total",
                "Token checks that read the database (not cached, or the cache not fresh).",
            )?,
            evictions: IntCounter::new(
                "identity_verify_cache_evictions_total",
                "Sessions dropped from the verification cache (a change of their user, or room).",
            )?,
            entries: IntGauge::new(
                "identity_verify_cache_entries",
                "Sessions kept in the verification cache.",
            )?,
        })
    }

    /// Every collector, for registration.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.hits.clone()),
            Box::new(self.misses.clone()),
            Box::new(self.evictions.clone()),
            Box::new(self.entries.clone()),
        ]
    }
}

/// What is kept of one user's checks: the user, its groups, and its
/// sessions. Kept per user, so that an eviction (always of a user) is one
/// removal, and the user is kept once however many sessions it has.
#[derive(Debug)]
struct Kept {
    user: User,
    password_changed_at: DateTime<Utc>,
    /// Shared with every other user in the same group (groups are
    /// immutable: a group id always names the same group).
    groups: Option<Box<[Arc<Group>]>>,
    sessions: Vec<KeptSession>,
}

#[derive(Debug, Clone, Copy)]
struct KeptSession {
    id: Uuid,
    /// Not ended (an end is a change, which evicts).
    open: bool,
    /// The refresh token's expiry (a time, not a change: checked at use).
    expire_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct State {
    /// Boxed: the table's slots stay small, and growing it moves pointers.
    users: HashMap<Uuid, Box<Kept>>,
    /// Sessions kept, in all (what `VERIFY_CACHE_SIZE` bounds).
    sessions: usize,
    /// Keys in insertion order, for room (a key no longer kept is skipped,
    /// and dropped when the queue outgrows what is kept).
    order: VecDeque<(Uuid, Uuid)>,
    /// One copy of each group the kept users are in.
    groups: HashMap<Uuid, Arc<Group>>,
    /// The size of `groups` after its last pruning.
    groups_pruned_at: usize,
    /// Evictions so far; a read's ticket.
    seq: u64,
    /// The last evictions, oldest first.
    recent: VecDeque<(u64, Uuid)>,
    /// The eviction count at the last clearing.
    cleared_at: u64,
    /// When the consumer last began a read that left nothing unapplied.
    fresh_as_of: Option<Instant>,
    /// Whether the consumer has a cursor: before, a read's result could
    /// miss a change committed before the cursor, so nothing is kept.
    following: bool,
    /// API keys checked, by the SHA-256 of their secret: whose, which key,
    /// and its methods; never changing (a key is never edited), so kept
    /// apart from the evictions. Its state (revoked, expired) is a session
    /// slot of its user's, evicted like any.
    keys: HashMap<[u8; 32], KnownKey>,
}

/// An API key the cache has seen: what never changes about it.
#[derive(Debug, Clone)]
pub struct KnownKey {
    /// The key's user.
    pub user_id: Uuid,
    /// The key.
    pub key_id: Uuid,
    /// The methods it is limited to; empty: not limited.
    pub allowed_methods: Arc<[String]>,
}

impl State {
    /// The kept copy of `group`.
    fn intern(&mut self, group: &Group) -> Arc<Group> {
        if let Some(kept) = self.groups.get(&group.id) {
            return kept.clone();
        }
        if self.groups.len() >= 2 * self.groups_pruned_at + 64 {
            // Groups no kept user is in any more.
            self.groups.retain(|_, g| Arc::strong_count(g) > 1);
            self.groups_pruned_at = self.groups.len();
        }
        let kept = Arc::new(group.clone());
        self.groups.insert(group.id, kept.clone());
        kept
    }

    /// Drops session `session` of `user`; whether it was kept.
    fn remove_session(&mut self, user: Uuid, session: Uuid) -> bool {
        let Some(kept) = self.users.get_mut(&user) else {
            return false;
        };
        let Some(i) = kept.sessions.iter().position(|s| s.id == session) else {
            return false;
        };
        kept.sessions.swap_remove(i);
        if kept.sessions.is_empty() {
            self.users.remove(&user);
        }
        self.sessions -= 1;
        true
    }
}

/// The verification cache (cheap to clone: shared).
#[derive(Clone)]
pub struct FreshCache {
    state: Arc<Mutex<State>>,
    capacity: usize,
    metrics: CacheMetrics,
}

impl std::fmt::Debug for FreshCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreshCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// A read's ticket: the eviction count when it began.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl FreshCache {
    /// A cache of at most `capacity` sessions.
    pub fn new(capacity: usize, metrics: CacheMetrics) -> Self {
        Self {
            state: Arc::default(),
            capacity: capacity.max(1),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The check of `session_id` of `user_id`, if kept, fresh, and (with
    /// `with_groups`) holding the groups; otherwise a ticket for the read.
    pub fn get(&self, user_id: Uuid, session_id: Uuid, with_groups: bool) -> Result<Fresh, Ticket> {
        let state = self.lock();
        let fresh = state.fresh_as_of.is_some_and(|t| t.elapsed() <= STALENESS);
        let hit = state
            .users
            .get(&user_id)
            .filter(|_| fresh)
            .filter(|k| !with_groups || k.groups.is_some())
            .and_then(|k| {
                let s = k.sessions.iter().find(|s| s.id == session_id)?;
                Some((k, *s))
            })
            // Expired since it was kept: read again (a Refresh may have
            // moved the expiry, which is no change).
            .filter(|(_, s)| !s.open || s.expire_time.is_none_or(|t| t > Utc::now()));
        match hit {
            Some((k, s)) => {
                self.metrics.hits.inc();
                Ok(Fresh {
                    user: k.user.clone(),
                    session_live: s.open,
                    password_changed_at: k.password_changed_at,
                    session_open: s.open,
                    session_expire_time: s.expire_time,
                    groups: if with_groups {
                        k.groups
                            .as_ref()
                            .map(|g| g.iter().map(|g| Group::clone(g)).collect())
                    } else {
                        None
                    },
                })
            }
            None => {
                self.metrics.misses.inc();
                Err(Ticket(state.seq))
            }
        }
    }

    /// A ticket for a read of something not asked for through [`Self::get`].
    pub fn ticket(&self) -> Ticket {
        self.metrics.misses.inc();
        Ticket(self.lock().seq)
    }

    /// The key whose secret has this SHA-256, if it was seen.
    pub fn key(&self, hash: &[u8; 32]) -> Option<KnownKey> {
        self.lock().keys.get(hash).cloned()
    }

    /// Remembers what never changes about a key seen now.
    pub fn remember_key(
        &self,
        hash: [u8; 32],
        user_id: Uuid,
        key_id: Uuid,
        allowed_methods: Arc<[String]>,
    ) {
        let mut state = self.lock();
        if state.keys.len() >= self.capacity {
            state.keys.clear();
        }
        state.keys.insert(
            hash,
            KnownKey {
                user_id,
                key_id,
                allowed_methods,
            },
        );
    }

    /// Keeps `fresh`, read with `ticket`, unless its user was evicted since.
    pub fn put(&self, ticket: Ticket, session_id: Uuid, fresh: &Fresh) {
        let user_id = fresh.user.id;
        let mut state = self.lock();
        let raced = !state.following
            || ticket.0 < state.cleared_at
            || state
                .recent
                .front()
                .is_some_and(|(seq, _)| ticket.0 + 1 < *seq)
            || state
                .recent
                .iter()
                .rev()
                .take_while(|(seq, _)| *seq > ticket.0)
                .any(|(_, u)| *u == user_id);
        if raced {
            return;
        }
        let groups = fresh
            .groups
            .as_ref()
            .map(|groups| groups.iter().map(|g| state.intern(g)).collect::<Box<[_]>>());
        let session = KeptSession {
            id: session_id,
            open: fresh.session_open,
            expire_time: fresh.session_expire_time,
        };
        let state = &mut *state;
        let kept = state.users.entry(user_id).or_insert_with(|| {
            Box::new(Kept {
                user: fresh.user.clone(),
                password_changed_at: fresh.password_changed_at,
                groups: None,
                sessions: Vec::with_capacity(1),
            })
        });
        // The user as read now (a read this ticket allows is as new as
        // any kept), and the groups if this read has them.
        kept.user.clone_from(&fresh.user);
        kept.password_changed_at = fresh.password_changed_at;
        if groups.is_some() {
            kept.groups = groups;
        }
        match kept.sessions.iter_mut().find(|s| s.id == session_id) {
            Some(s) => *s = session,
            None => {
                kept.sessions.push(session);
                state.sessions += 1;
                state.order.push_back((user_id, session_id));
            }
        }
        while state.sessions > self.capacity {
            let Some((user, session)) = state.order.pop_front() else {
                break;
            };
            if state.remove_session(user, session) {
                self.metrics.evictions.inc();
            }
        }
        if state.order.len() > 2 * state.sessions + 1024 {
            // Keys of sessions evicted with their user since, and earlier
            // places of sessions kept again: each kept session once, at its
            // latest place.
            let users = &state.users;
            let mut seen = std::collections::HashSet::with_capacity(state.sessions);
            let mut order: VecDeque<_> = state
                .order
                .iter()
                .rev()
                .filter(|(u, s)| {
                    users
                        .get(u)
                        .is_some_and(|k| k.sessions.iter().any(|x| x.id == *s))
                        && seen.insert((*u, *s))
                })
                .copied()
                .collect();
            order.make_contiguous().reverse();
            state.order = order;
        }
        self.metrics.entries.set(state.sessions as i64);
    }

    /// Drops every session of each of `users`.
    pub fn evict(&self, users: impl IntoIterator<Item = Uuid>) {
        let mut state = self.lock();
        for user in users {
            state.seq += 1;
            let seq = state.seq;
            state.recent.push_back((seq, user));
            if state.recent.len() > RECENT {
                state.recent.pop_front();
            }
            if let Some(kept) = state.users.remove(&user) {
                state.sessions -= kept.sessions.len();
                self.metrics.evictions.inc_by(kept.sessions.len() as u64);
            }
        }
        self.metrics.entries.set(state.sessions as i64);
    }

    /// Drops everything, and keeps only what is read from now on: the
    /// consumer (re)starts from the horizon, so a read begun before could
    /// hold a change it will never see.
    fn clear(&self) {
        let mut state = self.lock();
        state.following = true;
        state.seq += 1;
        state.cleared_at = state.seq;
        let n = state.sessions as u64;
        state.users.clear();
        state.sessions = 0;
        state.order.clear();
        state.groups.clear();
        state.groups_pruned_at = 0;
        state.keys.clear();
        state.recent.clear();
        self.metrics.evictions.inc_by(n);
        self.metrics.entries.set(0);
    }

    fn fresh_as_of(&self, at: Instant) {
        self.lock().fresh_as_of = Some(at);
    }

    fn distrust(&self) {
        self.lock().fresh_as_of = None;
    }

    /// Keeps the cache true until `stopped`: reads the feed after every
    /// announcement `heard` and at least every [`POLL`], evicts the users
    /// of each change, and marks the cache fresh after each read that left
    /// nothing unapplied.
    ///
    /// The reads go through a connection of the consumer's own, never the
    /// pool's: under load the pool's connections are all busy, and a cache
    /// that had lost its freshness (a slow read) would send every check to
    /// the database, keep the pool busy, and so never read the feed in
    /// time to be fresh again.
    pub(crate) async fn follow(
        self,
        database_url: String,
        mut heard: watch::Receiver<Heard>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut cursor: Option<Cursor> = None;
        let mut wait = Duration::from_millis(2);
        let mut own: Option<diesel_async::AsyncPgConnection> = None;
        loop {
            heard.borrow_and_update();
            let started = Instant::now();
            let mut again = false;
            let read = async {
                if own.is_none() {
                    own = Some(
                        db::connect::establish(&database_url)
                            .await
                            .map_err(|e| db::Error::Unavailable(Box::new(e)))?,
                    );
                }
                let conn = own.as_mut().ok_or_else(|| {
                    db::Error::Other("the consumer's connection went missing".into())
                })?;
                db::changes::read(
                    conn,
                    cursor.unwrap_or_default(),
                    &Filter::default(),
                    if cursor.is_some() { BATCH } else { 0 },
                )
                .await
            }
            .await;
            if read.is_err() {
                // Made again on the next round.
                own = None;
            }
            if let Ok(read) = read {
                let settled = read.newest.is_none_or(|n| n < read.horizon);
                match cursor {
                    // A start: follow from here, and keep only what is
                    // read from now on.
                    None => {
                        self.clear();
                        cursor = Some(Cursor::before(read.horizon));
                    }
                    Some(c) if c < read.purged => {
                        // Changes after the cursor are gone: trust nothing.
                        self.clear();
                        cursor = Some(Cursor::before(read.horizon));
                    }
                    Some(c) => {
                        if !read.changes.is_empty() {
                            wait = Duration::from_millis(2);
                        }
                        self.evict(read.changes.iter().filter_map(|c| c.user_id));
                        // The watchers' rule: after the last change, or
                        // past the horizon when the read came back short.
                        let batch = advance(c, read, BATCH);
                        again = batch.changes.len() as i64 >= BATCH;
                        cursor = Some(batch.cursor);
                    }
                }
                if !again && settled && cursor.is_some() {
                    self.fresh_as_of(started);
                }
                if !settled {
                    // Committed changes wait behind an older transaction.
                    again = true;
                }
            }
            if again {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => return,
                }
                wait = (wait * 2).min(POLL);
                continue;
            }
            wait = Duration::from_millis(2);
            tokio::select! {
                _ = heard.changed() => {
                    // The listener lost its connection: the database may
                    // be going away; trust nothing until a read succeeds.
                    if !heard.borrow().listening {
                        self.distrust();
                    }
                }
                _ = tokio::time::sleep(POLL) => {}
                _ = stopped.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(user: Uuid) -> Fresh {
        let now = Utc::now();
        Fresh {
            user: User {
                id: user,
                username: "u".into(),
                email: "u@example.com".into(),
                first_name: String::new(),
                last_name: String::new(),
                is_superuser: false,
                is_active: true,
                is_verified: false,
                attributes: serde_json::json!({}),
                create_time: now,
                update_time: now,
                is_service: false,
            },
            session_live: true,
            password_changed_at: now,
            session_open: true,
            session_expire_time: Some(now + chrono::Duration::hours(1)),
            groups: Some(Vec::new()),
        }
    }

    fn cache(capacity: usize) -> FreshCache {
        FreshCache::new(capacity, CacheMetrics::new().unwrap())
    }

    #[test]
    fn nothing_is_kept_before_the_consumer_follows_nor_answered_unless_fresh() {
        let c = cache(10);
        let (u, s) = (Uuid::now_v7(), Uuid::now_v7());
        let ticket = c.get(u, s, true).unwrap_err();
        c.put(ticket, s, &fresh(u));
        c.clear();
        c.fresh_as_of(Instant::now());
        let ticket = c.get(u, s, true).expect_err("kept before following");
        c.put(ticket, s, &fresh(u));
        assert!(c.get(u, s, true).is_ok());
        c.distrust();
        assert!(c.get(u, s, true).is_err(), "answered while not fresh");
    }

    #[test]
    fn a_read_that_raced_an_eviction_of_its_user_is_not_kept() {
        let c = cache(10);
        c.clear();
        c.fresh_as_of(Instant::now());
        let (u, other, s) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let ticket = c.get(u, s, false).unwrap_err();
        c.evict([u]);
        c.put(ticket, s, &fresh(u));
        assert!(c.get(u, s, false).is_err(), "kept a raced read");
        // Another user's eviction does not matter.
        let ticket = c.get(u, s, false).unwrap_err();
        c.evict([other]);
        c.put(ticket, s, &fresh(u));
        assert!(c.get(u, s, false).is_ok());
        // An eviction drops every session of the user.
        let s2 = Uuid::now_v7();
        let ticket = c.get(u, s2, false).unwrap_err();
        c.put(ticket, s2, &fresh(u));
        c.evict([u]);
        assert!(c.get(u, s, false).is_err() && c.get(u, s2, false).is_err());
    }

    #[test]
    fn the_cache_keeps_at_most_its_capacity() {
        let c = cache(2);
        c.clear();
        c.fresh_as_of(Instant::now());
        for _ in 0..5 {
            let (u, s) = (Uuid::now_v7(), Uuid::now_v7());
            let ticket = c.get(u, s, false).unwrap_err();
            c.put(ticket, s, &fresh(u));
        }
        assert_eq!(c.lock().sessions, 2);
        assert_eq!(c.metrics.entries.get(), 2);
    }

    #[test]
    fn churn_does_not_grow_the_cache_and_groups_are_kept_once() {
        let c = cache(10);
        c.clear();
        c.fresh_as_of(Instant::now());
        let group = Group {
            id: Uuid::now_v7(),
            groupname: "Ops".into(),
            slug: "ops".into(),
            create_time: Utc::now(),
        };
        let (u, s) = (Uuid::now_v7(), Uuid::now_v7());
        for round in 0..10_000 {
            // As the consumer does after each read.
            c.fresh_as_of(Instant::now());
            let ticket = c.get(u, s, true).unwrap_err();
            let mut f = fresh(u);
            f.groups = Some(vec![group.clone()]);
            c.put(ticket, s, &f);
            assert!(c.get(u, s, true).is_ok(), "round {round}");
            c.evict([u]);
        }
        let state = c.lock();
        assert_eq!(state.sessions, 0);
        assert!(state.order.len() <= 1024 + 1, "{}", state.order.len());
        drop(state);
        // Two users of one group share its one copy.
        for _ in 0..2 {
            let (u, s) = (Uuid::now_v7(), Uuid::now_v7());
            let ticket = c.get(u, s, true).unwrap_err();
            let mut f = fresh(u);
            f.groups = Some(vec![group.clone()]);
            c.put(ticket, s, &f);
            assert_eq!(c.get(u, s, true).unwrap().groups.unwrap()[0].slug, "ops");
        }
        let state = c.lock();
        assert_eq!(state.groups.len(), 1);
        assert_eq!(Arc::strong_count(&state.groups[&group.id]), 3);
    }

    /// The memory 100,000 sessions of distinct users take (each in two of
    /// sixteen groups, with names of realistic length), as the process's
    /// resident set grows: `cargo test --lib memory_per_session -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn memory_per_session() {
        fn rss_kib() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        }
        let n = 100_000;
        let now = Utc::now();
        let groups: Vec<Group> = (0..16)
            .map(|i| Group {
                id: Uuid::now_v7(),
                groupname: format!("Team {i}"),
                slug: format!("team-{i}"),
                create_time: now,
            })
            .collect();
        let c = cache(n);
        c.clear();
        let before = rss_kib();
        for i in 0..n {
            let (u, s) = (Uuid::now_v7(), Uuid::now_v7());
            let mut f = fresh(u);
            f.user.username = format!("margaret.hamilton{i}");
            f.user.email = format!("margaret.hamilton{i}@bench.example");
            f.user.first_name = "margaret".into();
            f.user.last_name = "hamilton".into();
            f.groups = Some(vec![groups[i % 16].clone(), groups[(i + 5) % 16].clone()]);
            let ticket = c.get(u, s, true).unwrap_err();
            c.put(ticket, s, &f);
        }
        let after = rss_kib();
        println!(
            "{n} sessions: {:.1} MiB, {} bytes each",
            (after - before) as f64 / 1024.0,
            (after - before) * 1024 / n as u64
        );
    }
}
