//! Calls refused with RESOURCE_EXHAUSTED, by cause: the one code covers
//! load shedding, a full hashing queue, login and reset throttling, the
//! stream limit and oversized messages, and an operator must tell them
//! apart. Each refusal is counted (`identity_resource_exhausted_total`,
//! label `cause`) and logged at WARN, at most once per cause every
//! [`LOG_EVERY`], with the number refused since the cause's last line: the
//! first refusal after a quiet spell is logged at once, the rest of a flood
//! in one line every 10 s. One line per refusal was rejected: a flood of
//! shed calls would become a flood of log lines, at the moment the
//! service can least afford them.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::{Duration, Instant};

/// The shortest time between two lines of one cause.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a call was refused with RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// `MAX_CONCURRENT_REQUESTS` calls were in flight: shed at once.
    LoadShed,
    /// `HASH_QUEUE` callers already waited for a hashing thread.
    HashQueue,
    /// A password or code check (Login, CompleteLogin, ChangePassword,
    /// DisableTotp) on a locked account or login name, or one that waited
    /// a whole lease for its turn.
    LoginThrottle,
    /// Too many password reset requests for one address.
    ResetThrottle,
    /// `MAX_STREAMS` streams were open.
    StreamLimit,
    /// A request message over the 64 KiB limit.
    MessageTooLarge,
}

impl Cause {
    /// Every cause, in the order of their label values on `/metrics`.
    pub const ALL: [Cause; 6] = [
        Cause::LoadShed,
        Cause::HashQueue,
        Cause::LoginThrottle,
        Cause::ResetThrottle,
        Cause::StreamLimit,
        Cause::MessageTooLarge,
    ];

    /// The `cause` label and log field: never changes (alerts match it).
    pub const fn as_str(self) -> &'static str {
        match self {
            Cause::LoadShed => "load_shed",
            Cause::HashQueue => "hash_queue",
            Cause::LoginThrottle => "login_throttle",
            Cause::ResetThrottle => "reset_throttle",
            Cause::StreamLimit => "stream_limit",
            Cause::MessageTooLarge => "message_too_large",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// The refusals of one server, shared by the layers and services that
/// refuse; cheap to clone. One made with [`Refusals::default`] and never
/// shared (a command's hasher) counts and logs the same way, unread.
#[derive(Clone, Default)]
pub struct Refusals {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    tallies: [Tally; Cause::ALL.len()],
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            tallies: Default::default(),
        }
    }
}

#[derive(Default)]
struct Tally {
    total: AtomicU64,
    /// Refused since the cause's last line.
    unlogged: AtomicU64,
    /// Milliseconds after `started` before which no line is written.
    quiet_until: AtomicU64,
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for cause in Cause::ALL {
            map.entry(&cause.as_str(), &self.count(cause));
        }
        map.finish()
    }
}

impl Refusals {
    /// Counts one refusal, and logs it if its cause's last line is
    /// [`LOG_EVERY`] old.
    pub fn refuse(&self, cause: Cause) {
        self.tally(cause);
        self.log_due(cause, self.now_ms());
    }

    /// Refusals of `cause` since start.
    pub fn count(&self, cause: Cause) -> u64 {
        self.inner.tallies[cause.index()]
            .total
            .load(Ordering::Relaxed)
    }

    /// Logs, for every cause whose last line is old enough, what was refused
    /// since; every second until `stopped`, so that the end of a flood is
    /// logged too, within [`LOG_EVERY`] and a second.
    pub async fn report(self, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            let now = self.now_ms();
            for cause in Cause::ALL {
                self.log_due(cause, now);
            }
        }
    }

    fn tally(&self, cause: Cause) {
        let tally = &self.inner.tallies[cause.index()];
        tally.total.fetch_add(1, Ordering::Relaxed);
        tally.unlogged.fetch_add(1, Ordering::AcqRel);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Writes the line of `cause` if some refusals are unlogged and its
    /// last line is [`LOG_EVERY`] old at `now_ms`; how many it reported.
    /// Lock-free: of callers that find the line due at once, one wins the
    /// exchange and writes it.
    fn log_due(&self, cause: Cause, now_ms: u64) -> Option<u64> {
        let tally = &self.inner.tallies[cause.index()];
        let quiet_until = tally.quiet_until.load(Ordering::Acquire);
        if now_ms < quiet_until || tally.unlogged.load(Ordering::Acquire) == 0 {
            return None;
        }
        let every = u64::try_from(LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        tally
            .quiet_until
            .compare_exchange(
                quiet_until,
                now_ms.saturating_add(every),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .ok()?;
        let refused = tally.unlogged.swap(0, Ordering::AcqRel);
        if refused == 0 {
            return None;
        }
        tracing::warn!(
            cause = cause.as_str(),
            refused,
            total = tally.total.load(Ordering::Relaxed),
            "calls refused with RESOURCE_EXHAUSTED"
        );
        Some(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_logged_at_once_and_a_flood_once_per_interval() {
        let refusals = Refusals::default();
        let every = LOG_EVERY.as_millis() as u64;
        refusals.tally(Cause::LoadShed);
        assert_eq!(refusals.log_due(Cause::LoadShed, 0), Some(1));
        for _ in 0..500 {
            refusals.tally(Cause::LoadShed);
        }
        assert_eq!(
            refusals.log_due(Cause::LoadShed, every - 1),
            None,
            "quiet for the interval"
        );
        assert_eq!(
            refusals.log_due(Cause::LoadShed, every),
            Some(500),
            "then the count since the last line"
        );
        assert_eq!(
            refusals.log_due(Cause::LoadShed, 10 * every),
            None,
            "nothing refused since: no line"
        );
        assert_eq!(refusals.count(Cause::LoadShed), 501);
    }

    #[test]
    fn causes_are_counted_and_logged_apart() {
        let refusals = Refusals::default();
        refusals.tally(Cause::HashQueue);
        assert_eq!(refusals.log_due(Cause::HashQueue, 0), Some(1));
        refusals.tally(Cause::StreamLimit);
        assert_eq!(
            refusals.log_due(Cause::StreamLimit, 1),
            Some(1),
            "another cause's line does not hold this one back"
        );
        assert_eq!(refusals.count(Cause::HashQueue), 1);
        assert_eq!(refusals.count(Cause::StreamLimit), 1);
        assert_eq!(refusals.count(Cause::LoadShed), 0);
    }

    #[test]
    fn labels_are_the_documented_names() {
        let labels: Vec<&str> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            labels,
            [
                "load_shed",
                "hash_queue",
                "login_throttle",
                "reset_throttle",
                "stream_limit",
                "message_too_large"
            ]
        );
        for (i, cause) in Cause::ALL.iter().enumerate() {
            assert_eq!(cause.index(), i);
        }
    }
}
