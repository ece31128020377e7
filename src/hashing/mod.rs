//! Password hashing with argon2id, off the async workers and bounded.
//!
//! A hash costs tens of milliseconds of CPU and ~19 MiB of memory, so it runs
//! on `HASH_CONCURRENCY` threads of its own, each with its argon2 memory
//! allocated once and reused: no thread is started and no memory is
//! allocated or faulted in per hash, and the memory of hashing stays at
//! `HASH_CONCURRENCY` x the argon2 memory however many logins arrive. (On
//! tokio's blocking pool every hash could land on a new thread whose
//! allocator arena then kept its 19 MiB.) Callers beyond that wait in a
//! queue of at most `HASH_QUEUE`; past it they are refused at once with
//! RESOURCE_EXHAUSTED, so that a flood of logins cannot pile up memory or
//! starve the calls that need no hashing.
//!
//! This file is the pool: its parameters, threads, memory and queue. The
//! hash formats it reads and writes (argon2 PHC strings, bcrypt from other
//! systems, the bounds on imported hashes) are in `formats.rs`.

mod formats;

pub use formats::{check_imported_hash, verify_phc};

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
    mpsc,
};
use std::time::Duration;

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::{PasswordHash, PasswordHasher as _, SaltString, rand_core::OsRng},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::domain::Password;
use crate::error::Error;
use crate::limits::{Cause, Refusals};

use formats::hash_phc;

/// The argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl HashParams {
    /// OWASP's recommendation for argon2id: 19 MiB, 2 passes, 1 lane.
    pub const OWASP: Self = Self {
        memory_kib: 19_456,
        iterations: 2,
        parallelism: 1,
    };
}

/// Hashes and verifies passwords with bounded concurrency.
#[derive(Debug, Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
    /// Where a caller refused for a full queue is counted.
    refusals: Refusals,
}

#[derive(Debug)]
struct Inner {
    argon2: Argon2<'static>,
    slots: Arc<Semaphore>,
    /// Work for the hashing threads; they end when it is dropped.
    jobs: Mutex<mpsc::Sender<Job>>,
    waiting: AtomicUsize,
    queue_limit: usize,
    /// A real hash of a random password, verified when a login names nobody,
    /// so that an unknown login costs what a wrong password costs.
    dummy_hash: String,
}

/// Why the hasher could not start. Not a database error, nor a call's: it
/// stops start-up with a message of its own.
#[derive(Debug, thiserror::Error)]
pub enum HasherError {
    /// argon2 refuses the parameters together (each is valid on its own).
    #[error(
        "argon2 refuses ARGON2_MEMORY_KIB={memory_kib}, ARGON2_ITERATIONS={iterations}, \
         ARGON2_PARALLELISM={parallelism} together: {reason}"
    )]
    Params {
        /// Memory in KiB.
        memory_kib: u32,
        /// Passes.
        iterations: u32,
        /// Lanes.
        parallelism: u32,
        /// argon2's words.
        reason: String,
    },
    /// The first hash (of the dummy password) failed.
    #[error("argon2 could not hash: {0}")]
    Hash(String),
    /// The operating system would not start a hashing thread.
    #[error("cannot start a hashing thread (HASH_CONCURRENCY): {0}")]
    Thread(#[source] std::io::Error),
}

impl Hasher {
    /// A hasher with `concurrency` slots and a queue of `queue_limit`.
    pub fn new(
        params: HashParams,
        concurrency: usize,
        queue_limit: usize,
    ) -> Result<Self, HasherError> {
        let HashParams {
            memory_kib,
            iterations,
            parallelism,
        } = params;
        let params = Params::new(memory_kib, iterations, parallelism, None).map_err(|e| {
            HasherError::Params {
                memory_kib,
                iterations,
                parallelism,
                reason: e.to_string(),
            }
        })?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::generate(&mut OsRng);
        let dummy_hash = argon2
            .hash_password(SaltString::generate(&mut OsRng).as_str().as_bytes(), &salt)
            .map_err(|e| HasherError::Hash(e.to_string()))?
            .to_string();
        let concurrency = concurrency.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..concurrency {
            let queue = Arc::clone(&queue);
            let memory = Memory::for_params(Some(argon2.params()));
            std::thread::Builder::new()
                .name(format!("identity-hash-{n}"))
                .spawn(move || hashing_thread(&queue, memory))
                .map_err(HasherError::Thread)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                argon2,
                slots: Arc::new(Semaphore::new(concurrency)),
                jobs: Mutex::new(jobs),
                waiting: AtomicUsize::new(0),
                queue_limit,
                dummy_hash,
            }),
            refusals: Refusals::default(),
        })
    }

    /// Counts callers refused for a full queue in `refusals` (the server's),
    /// as [`Cause::HashQueue`].
    #[must_use]
    pub fn counting(mut self, refusals: Refusals) -> Self {
        self.refusals = refusals;
        self
    }

    /// The PHC string of a fresh argon2id hash of `password`.
    pub async fn hash(&self, password: &Password) -> Result<String, Error> {
        let password = password.expose().to_owned();
        self.run(move |inner, memory| hash_phc(&inner.argon2, memory, password.as_bytes()))
            .await
    }

    /// Whether `password` matches the PHC string `hash`. With `None` (no such
    /// user) it verifies against a dummy hash and answers false, at the same
    /// cost.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, Error> {
        let password = password.to_owned();
        let hash = hash.map(str::to_owned);
        self.run(move |inner, memory| {
            let known = hash.is_some();
            let phc = hash.as_deref().unwrap_or(&inner.dummy_hash);
            let ok = verify_phc(memory, password.as_bytes(), phc)?;
            Ok(ok && known)
        })
        .await
    }

    /// Whether a stored hash is not argon2id v1.3 with exactly the
    /// configured parameters (weaker, or stronger as passlib's and pwdlib's
    /// defaults are, whose cost at every login the service did not choose),
    /// so that a successful login should rewrite it.
    pub fn needs_rehash(&self, hash: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(hash) else {
            return true;
        };
        if parsed.algorithm != argon2::ARGON2ID_IDENT {
            return true;
        }
        let Ok(stored) = Params::try_from(&parsed) else {
            return true;
        };
        let wanted = self.inner.argon2.params();
        stored.m_cost() != wanted.m_cost()
            || stored.t_cost() != wanted.t_cost()
            || stored.p_cost() != wanted.p_cost()
            || parsed.version != Some(Version::V0x13 as u32)
    }

    /// How many callers wait for a slot now.
    pub fn queue_depth(&self) -> usize {
        self.inner.waiting.load(Ordering::Relaxed)
    }

    async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &mut Memory) -> Result<T, Error> + Send + 'static,
    {
        let permit = {
            // Counted while waiting; the guard uncounts even when the caller
            // is cancelled (deadline, client gone) during the wait.
            let _waiting = Waiting::enter(&self.inner).inspect_err(|_| {
                self.refusals.refuse(Cause::HashQueue);
            })?;
            self.inner
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(Error::internal)?
        };
        // A permit is a free thread: the job starts at once. The permit
        // travels with the job, so a cancelled caller does not free its slot
        // while its hash still runs.
        let inner = Arc::clone(&self.inner);
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _permit: OwnedSemaphorePermit = permit;
            let _ = done.send(f(&inner, memory));
        });
        self.inner
            .jobs
            .lock()
            .map_err(|_| Error::internal("hashing queue poisoned"))?
            .send(job)
            .map_err(|_| Error::internal("hashing threads gone"))?;
        result
            .await
            .map_err(|_| Error::internal("a hashing thread failed"))?
    }
}

/// Work for a hashing thread.
type Job = Box<dyn FnOnce(&mut Memory) + Send>;

/// A hashing thread's argon2 memory, allocated once for the configured
/// parameters and reused by every hash on that thread.
pub struct Memory {
    blocks: Vec<Block>,
}

/// The size, not the blocks: they are scratch space, 1 KiB each.
impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl Memory {
    /// Memory for hashes with `params`.
    pub fn new(params: HashParams) -> Self {
        let params = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        );
        Self::for_params(params.as_ref().ok())
    }

    fn for_params(params: Option<&Params>) -> Self {
        Self {
            blocks: vec![Block::default(); params.map_or(0, Params::block_count)],
        }
    }

    /// `count` blocks: the kept ones, or (for a stored hash stronger than
    /// the configured parameters, until its user's next login rehashes it)
    /// a one-off allocation.
    fn with<R>(&mut self, count: usize, f: impl FnOnce(&mut [Block]) -> R) -> R {
        if count <= self.blocks.len() {
            f(&mut self.blocks[..count])
        } else {
            f(&mut vec![Block::default(); count])
        }
    }
}

fn hashing_thread(queue: &Mutex<mpsc::Receiver<Job>>, mut memory: Memory) {
    loop {
        // The lock is held only while waiting for the next job.
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(&mut memory),
            Err(mpsc::RecvError) => return,
        }
    }
}

/// One caller in the hashing queue, uncounted when dropped.
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn enter(inner: &'a Inner) -> Result<Self, Error> {
        if inner.waiting.fetch_add(1, Ordering::AcqRel) >= inner.queue_limit {
            inner.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Throttled {
                message: "password hashing capacity exhausted",
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(Self(inner))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const CHEAP: HashParams = HashParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = Hasher::new(CHEAP, 2, 8).unwrap();
        let pw =
            Password::parse("correct horse", &[], &crate::domain::BreachedList::empty()).unwrap();
        let hash = hasher.hash(&pw).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert!(hasher.verify("correct horse", Some(&hash)).await.unwrap());
        assert!(!hasher.verify("wrong horse", Some(&hash)).await.unwrap());
        assert!(!hasher.verify("correct horse", None).await.unwrap());
    }

    #[tokio::test]
    async fn weaker_hashes_need_a_rehash() {
        let weak = Hasher::new(CHEAP, 1, 8).unwrap();
        let strong = Hasher::new(
            HashParams {
                memory_kib: 128,
                ..CHEAP
            },
            1,
            8,
        )
        .unwrap();
        let pw =
            Password::parse("correct horse", &[], &crate::domain::BreachedList::empty()).unwrap();
        let weak_hash = weak.hash(&pw).await.unwrap();
        let strong_hash = strong.hash(&pw).await.unwrap();
        assert!(strong.needs_rehash(&weak_hash));
        assert!(!strong.needs_rehash(&strong_hash));
        assert!(
            weak.needs_rehash(&strong_hash),
            "a stronger hash is rewritten too: its cost is not the one configured"
        );
        // pwdlib's and passlib's default (argon2-cffi 25.1.0).
        let pwdlib = "$argon2id$v=19$m=65536,t=3,p=4$W0weUSGgu99Mz55kJ2uKnA$9rSJp1K47doHn8RvMhtRlejQgb0gnvxxNEJDo/7osJs";
        assert!(strong.needs_rehash(pwdlib));
        assert_eq!(check_imported_hash(pwdlib), Ok(()));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_with_resource_exhausted() {
        let hasher = Hasher::new(CHEAP, 1, 0).unwrap();
        let pw =
            Password::parse("correct horse", &[], &crate::domain::BreachedList::empty()).unwrap();
        let err = hasher.hash(&pw).await.unwrap_err();
        assert!(matches!(err, Error::Throttled { .. }));
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let hasher = Hasher::new(CHEAP, 1, 1).unwrap();
        let pw =
            Password::parse("correct horse", &[], &crate::domain::BreachedList::empty()).unwrap();
        // Hold the only slot, so that the next caller waits.
        let held = hasher.inner.slots.clone().acquire_owned().await.unwrap();
        let mut waiter = Box::pin(hasher.hash(&pw));
        assert!(
            futures_poll_once(waiter.as_mut()).await.is_none(),
            "waits for the slot"
        );
        assert_eq!(hasher.queue_depth(), 1);
        drop(waiter);
        assert_eq!(hasher.queue_depth(), 0, "the cancelled caller is uncounted");
        drop(held);
        assert!(hasher.hash(&pw).await.is_ok());
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
