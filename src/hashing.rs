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

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
    mpsc,
};
use std::time::Duration;

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::{
        Output, ParamsString, PasswordHash, PasswordHasher as _, SaltString, rand_core::OsRng,
    },
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::domain::Password;
use crate::error::Error;

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
        })
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
            let _waiting = Waiting::enter(&self.inner)?;
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

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
}

/// The strongest parameters an imported hash may have: verifying it costs
/// its memory and time at every login until it is rehashed.
/// (64 MiB and 3 passes are passlib's and pwdlib's argon2 defaults; cost 12
/// their bcrypt default.)
const MAX_IMPORTED_MEMORY_KIB: u32 = 64 * 1024;
const MAX_IMPORTED_ITERATIONS: u32 = 10;
const MAX_IMPORTED_PARALLELISM: u32 = 16;
const MAX_IMPORTED_BCRYPT_COST: u32 = 14;
const MIN_BCRYPT_COST: u32 = 4;

/// Checks a password hash brought in from another system: an argon2 PHC
/// string (`$argon2id$`, `$argon2i$`, `$argon2d$`) or a bcrypt hash (`$2b$`,
/// `$2a$`, `$2y$`), within parameters this service can afford to verify.
pub fn check_imported_hash(hash: &str) -> Result<(), String> {
    let hash = hash.trim();
    if is_bcrypt(hash) {
        if !hash.is_ascii() {
            return Err("not a valid bcrypt hash".into());
        }
        let parts: bcrypt::HashParts = hash
            .parse()
            .map_err(|e| format!("not a valid bcrypt hash: {e}"))?;
        let cost = parts.get_cost();
        if !(MIN_BCRYPT_COST..=MAX_IMPORTED_BCRYPT_COST).contains(&cost) {
            return Err(format!(
                "bcrypt cost must be {MIN_BCRYPT_COST} to {MAX_IMPORTED_BCRYPT_COST} (got {cost})"
            ));
        }
        // The layout is checked above; the salt and hash encoding only by
        // verifying: a copy at the lowest cost takes about a millisecond.
        let probe = format!("{}04{}", &hash[..4], &hash[6..]);
        bcrypt::verify("", &probe).map_err(|e| format!("not a valid bcrypt hash: {e}"))?;
        return Ok(());
    }
    let usage = "must be an argon2 PHC string ($argon2id$...) or a bcrypt hash ($2b$...)";
    let parsed = PasswordHash::new(hash).map_err(|_| usage.to_owned())?;
    Algorithm::try_from(parsed.algorithm).map_err(|_| usage.to_owned())?;
    if let Some(v) = parsed.version {
        Version::try_from(v).map_err(|e| format!("argon2 version: {e}"))?;
    }
    let params = Params::try_from(&parsed).map_err(|e| format!("argon2 parameters: {e}"))?;
    let (Some(salt), Some(_)) = (parsed.salt, parsed.hash) else {
        return Err("argon2 hash without salt or output".into());
    };
    let mut salt_bytes = [0u8; 64];
    let salt_len = salt
        .decode_b64(&mut salt_bytes)
        .map_err(|e| format!("argon2 salt: {e}"))?
        .len();
    if salt_len < 8 {
        return Err("argon2 salt shorter than 8 bytes".into());
    }
    if params.m_cost() > MAX_IMPORTED_MEMORY_KIB
        || params.t_cost() > MAX_IMPORTED_ITERATIONS
        || params.p_cost() > MAX_IMPORTED_PARALLELISM
    {
        return Err(format!(
            "argon2 parameters above m={MAX_IMPORTED_MEMORY_KIB},t={MAX_IMPORTED_ITERATIONS},p={MAX_IMPORTED_PARALLELISM}"
        ));
    }
    Ok(())
}

fn stored(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("stored hash: {e}"))
}

/// A fresh argon2id PHC string of `password`, computed in `memory`.
fn hash_phc(argon2: &Argon2<'_>, memory: &mut Memory, password: &[u8]) -> Result<String, Error> {
    let fail = |e: &dyn std::fmt::Display| Error::internal(format!("argon2: {e}"));
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut salt_bytes)
        .map_err(|e| fail(&e))?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    memory
        .with(argon2.params().block_count(), |blocks| {
            argon2.hash_password_into_with_memory(password, salt_bytes, &mut out, blocks)
        })
        .map_err(|e| fail(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(argon2.params()).map_err(|e| fail(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| fail(&e))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the argon2 PHC string `phc` (any variant,
/// version and parameters it names), computed in `memory`; the comparison
/// is constant-time. What the hashing threads run for a login, exposed for
/// the benchmark's hashing ceiling.
pub fn verify_phc(memory: &mut Memory, password: &[u8], phc: &str) -> Result<bool, Error> {
    if is_bcrypt(phc) {
        // Imported from passlib, pwdlib or another bcrypt user; rehashed
        // with argon2id at the first successful login.
        return bcrypt::verify(password, phc).map_err(stored);
    }
    let parsed = PasswordHash::new(phc).map_err(stored)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(stored)?;
    // A hash without `v=` is version 1.0, as the reference implementation
    // and passlib write it.
    let version = parsed
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(stored)?
        .unwrap_or(Version::V0x10);
    let params = Params::try_from(&parsed).map_err(stored)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(stored("no salt or no hash"));
    };
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(stored)?;
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    // A password argon2 refuses (too long) matches nothing.
    if memory
        .with(blocks, |m| {
            argon2.hash_password_into_with_memory(password, salt_bytes, out, m)
        })
        .is_err()
    {
        return Ok(false);
    }
    Ok(Output::new(out).map_err(stored)? == expected)
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

    const CHEAP: HashParams = HashParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = Hasher::new(CHEAP, 2, 8).unwrap();
        let pw = Password::parse("correct horse", &[]).unwrap();
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
        let pw = Password::parse("correct horse", &[]).unwrap();
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

    #[test]
    fn imported_hashes_are_checked_and_bounded() {
        // Python bcrypt 5.0.0, "imported password one".
        let bcrypt = "$2b$04$C2ySnT/AI1FbR6CJ7gXhmOGb8W0LUirb877YzEEJ.ybDTyVL0cpUq";
        assert_eq!(check_imported_hash(bcrypt), Ok(()));
        let mut memory = Memory::new(CHEAP);
        assert!(verify_phc(&mut memory, b"imported password one", bcrypt).unwrap());
        assert!(!verify_phc(&mut memory, b"imported password two", bcrypt).unwrap());
        let too_costly = "$2b$31$C2ySnT/AI1FbR6CJ7gXhmOGb8W0LUirb877YzEEJ.ybDTyVL0cpUq";
        assert!(check_imported_hash(too_costly).is_err());
        let huge = "$argon2id$v=19$m=4194304,t=1,p=1$KXUz4YO2648x7oeaHr4liw$IH/D3v/mvrc2M8k24pPdsv1z5TFxZYJJesJPOfu2cF0";
        assert!(check_imported_hash(huge).unwrap_err().contains("above"));
        let low_cost = "$2b$03$C2ySnT/AI1FbR6CJ7gXhmOGb8W0LUirb877YzEEJ.ybDTyVL0cpUq";
        assert!(check_imported_hash(low_cost).is_err());
        let bad_alphabet = "$2b$04$C2ySnT/AI1FbR6CJ7gXhmOGb8W0LUirb877YzEEJ.ybDTyVL0cp!!";
        assert!(check_imported_hash(bad_alphabet).is_err());
        let short_salt =
            "$argon2id$v=19$m=1024,t=1,p=1$c2FsdA$IH/D3v/mvrc2M8k24pPdsv1z5TFxZYJJesJPOfu2cF0";
        assert!(
            check_imported_hash(short_salt)
                .unwrap_err()
                .contains("salt")
        );
        for junk in ["", "md5$abc", "$argon2id$v=19$m=64,t=1,p=1", "$2b$04$short"] {
            assert!(check_imported_hash(junk).is_err(), "{junk}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_with_resource_exhausted() {
        let hasher = Hasher::new(CHEAP, 1, 0).unwrap();
        let pw = Password::parse("correct horse", &[]).unwrap();
        let err = hasher.hash(&pw).await.unwrap_err();
        assert!(matches!(err, Error::Throttled { .. }));
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let hasher = Hasher::new(CHEAP, 1, 1).unwrap();
        let pw = Password::parse("correct horse", &[]).unwrap();
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
