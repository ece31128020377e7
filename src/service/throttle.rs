//! Login throttling: consecutive failed password checks lock an account (or
//! an unknown login name) for a delay that doubles from 1 s to 15 min.
//!
//! An attempt takes a lease before its password is checked and settles it
//! after: success clears the failures, a mismatch counts one, and an attempt
//! that never reached a verdict (cancelled, timed out, no hashing capacity,
//! a database blip) counts nothing. Leases are rows shared by the replicas
//! (`db::throttle`), and only as many checks may be under way as the
//! failures so far leave room for (`FREE_FAILURES` in all), so 100 parallel
//! wrong guesses reach at most 5 password checks before the lock.
//!
//! Attempts beyond that room wait for the checks under way to end instead of
//! being refused or counted: 50 workers of one service logging in with one
//! account at start-up all get in, a few at a time. The wait is bounded by
//! the call's deadline (the deadline layer drops the future) and by the
//! lease's lifetime. The rejected alternative, counting every attempt as a
//! failure before its check and taking the count back after, locked out
//! exactly those parallel correct logins, and lost the take-back whenever a
//! call was cancelled.

use std::{sync::Arc, time::Duration};

use diesel_async::AsyncPgConnection;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::db::{self, Pool, throttle::Claim};
use crate::error::Error;
use crate::limits::{Cause, Refusals};

/// Consecutive failures allowed before a login key is locked.
pub const FREE_FAILURES: i32 = 5;
/// The longest lock, in seconds.
pub const MAX_LOCK_SECONDS: i32 = 15 * 60;
/// The longest pause between two looks at a busy key; a check ending on this
/// replica wakes waiters at once, one on another replica within this.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// The throttling key of an account.
pub fn user_key(id: Uuid) -> String {
    format!("user:{id}")
}

/// The throttling key `<kind>:<SHA-256 of name>` of something that may name
/// no account (a login, an address): the table holds no typed-in names.
pub fn hashed_key(kind: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(name.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{kind}:{hex}")
}

/// Hands out leases for password checks.
#[derive(Clone)]
pub struct Throttle {
    pool: Pool,
    /// How long a lease lives if its replica dies before settling it: longer
    /// than any call may last.
    lease: Duration,
    /// Woken whenever a lease of this process ends.
    ended: Arc<Notify>,
    /// Where a refused attempt is counted.
    refusals: Refusals,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    /// A throttle whose leases outlive a dead replica by `lease`.
    pub fn new(pool: Pool, lease: Duration) -> Self {
        Self {
            pool,
            lease,
            ended: Arc::new(Notify::new()),
            refusals: Refusals::default(),
        }
    }

    /// Counts refused attempts in `refusals` (the server's), as
    /// [`Cause::LoginThrottle`].
    pub fn count_in(&mut self, refusals: Refusals) {
        self.refusals = refusals;
    }

    /// Waits for room to check a password on `key`; RESOURCE_EXHAUSTED while
    /// the key is locked. The first look uses `conn` (which the caller has
    /// checked out anyway), later ones their own. Returns the lease and
    /// whether the attempt had to wait (the caller then reads the password
    /// hash again: it may have changed meanwhile).
    pub async fn claim(&self, conn: db::Conn, key: String) -> Result<(Lease, bool), Error> {
        let id = Uuid::now_v7();
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(5);
        let mut conn = Some(conn);
        let mut waited = false;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let conn = match conn.take() {
                Some(conn) => conn,
                None => db::conn(&self.pool).await?,
            };
            match self.try_claim(conn, &key, id).await? {
                Looked::Granted(lease) => return Ok((lease, waited)),
                Looked::Locked(until) => {
                    tracing::info!("attempt refused: throttled");
                    self.refusals.refuse(Cause::LoginThrottle);
                    return Err(super::throttled(
                        "too many failed logins; try again later",
                        until,
                    ));
                }
                Looked::Busy if started.elapsed() >= self.lease => {
                    // Leases that never end: a replica died mid-check, or the
                    // clocks disagree. Refuse rather than wait for ever.
                    self.refusals.refuse(Cause::LoginThrottle);
                    return Err(super::throttled(
                        "too many logins at once; try again later",
                        chrono::Utc::now() + chrono::Duration::seconds(1),
                    ));
                }
                Looked::Busy => {
                    waited = true;
                    tokio::select! {
                        () = &mut ended => {}
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    /// One look at `key`, taking lease `id` if there is room. The statement
    /// runs in a task of its own, and a granted lease is made a [`Lease`]
    /// there, before it is handed over: wherever the call is cancelled (while
    /// the statement runs, or after the answer is sent and before it is
    /// read), the `Lease` is dropped unsettled and gives itself back. A
    /// statement that failed may still have committed (a connection lost
    /// after the commit): its lease is given back too.
    async fn try_claim(&self, mut conn: db::Conn, key: &str, id: Uuid) -> Result<Looked, Error> {
        let (answer, asked) = tokio::sync::oneshot::channel();
        let (key, lease) = (key.to_owned(), self.lease.as_secs_f64());
        let throttle = self.clone();
        tokio::spawn(async move {
            let looked = match db::throttle::claim(&mut conn, &key, id, FREE_FAILURES, lease).await
            {
                Ok(Claim::Granted) => Ok(Looked::Granted(Lease {
                    id,
                    key,
                    throttle,
                    settled: false,
                })),
                Ok(Claim::Busy) => Ok(Looked::Busy),
                Ok(Claim::Locked(until)) => Ok(Looked::Locked(until)),
                Err(e) => {
                    drop(conn);
                    drop(Lease {
                        id,
                        key,
                        throttle,
                        settled: false,
                    });
                    Err(e)
                }
            };
            // Nobody waits any more: a granted lease is dropped here, and
            // gives itself back.
            let _ = answer.send(looked);
        });
        Ok(asked
            .await
            .map_err(|_| Error::internal("the claim of a login lease was lost"))??)
    }

    /// Wakes the attempts of this process that wait for room.
    fn wake(&self) {
        self.ended.notify_waiters();
    }
}

/// What one look at a key found.
#[derive(Debug)]
enum Looked {
    /// Room: the lease to check a password with.
    Granted(Lease),
    /// The checks under way fill the budget.
    Busy,
    /// Locked until then.
    Locked(chrono::DateTime<chrono::Utc>),
}

/// The right to check one password on one key. Settle it with
/// [`Lease::matched`] or [`Lease::mismatched`]; dropped unsettled (the call
/// was cancelled, or failed before a verdict), it is given back in the
/// background and counts nothing.
pub struct Lease {
    id: Uuid,
    key: String,
    throttle: Throttle,
    settled: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Lease {
    /// The password matched: the key's failures are forgotten.
    pub async fn matched(mut self, conn: &mut AsyncPgConnection) -> Result<(), Error> {
        db::throttle::succeed(conn, &self.key, self.id).await?;
        self.settled = true;
        self.throttle.wake();
        Ok(())
    }

    /// The password matched but a second factor is still to come: the
    /// lease is given back, and the key's failures are kept (cleared only
    /// by the login that completes).
    pub async fn undecided(mut self, conn: &mut AsyncPgConnection) -> Result<(), Error> {
        db::throttle::release(conn, self.id).await?;
        self.settled = true;
        self.throttle.wake();
        Ok(())
    }

    /// The password did not match: one more failure on the key.
    pub async fn mismatched(mut self, conn: &mut AsyncPgConnection) -> Result<(), Error> {
        db::throttle::fail(conn, &self.key, self.id, FREE_FAILURES, MAX_LOCK_SECONDS).await?;
        self.settled = true;
        self.throttle.wake();
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (id, throttle) = (self.id, self.throttle.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // No runtime left: the lease expires on its own.
        };
        runtime.spawn(async move {
            let released = async {
                let mut conn = db::conn(&throttle.pool).await?;
                db::throttle::release(&mut conn, id).await
            };
            if let Err(e) = released.await {
                tracing::warn!(error = %e, "a login lease stays until it expires");
            }
            throttle.wake();
        });
    }
}
