//! The load driver: many calls in flight for a warm-up then a fixed window,
//! latencies of the calls that complete inside the window in an HDR
//! histogram, errors counted by status code.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use hdrhistogram::Histogram;

/// One call of a scenario; `Err` carries a label (the status code).
pub type Call = Box<dyn FnMut() -> BoxFuture<'static, Result<(), String>> + Send>;

/// When to measure: the calls that complete in `[from, end)`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from: Instant,
    pub end: Instant,
}

impl Window {
    /// A window that opens after `warmup` from now and lasts `measure`.
    pub fn after(warmup: Duration, measure: Duration) -> Self {
        let from = Instant::now() + warmup;
        Self {
            from,
            end: from + measure,
        }
    }

    pub fn seconds(&self) -> f64 {
        (self.end - self.from).as_secs_f64()
    }
}

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Latencies of successful calls, in microseconds.
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
}

impl Outcome {
    pub fn new(seconds: f64) -> Self {
        Self {
            latency: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            seconds,
        }
    }

    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// A latency quantile in milliseconds.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn merge(&mut self, other: &Outcome) {
        self.latency.add(&other.latency).expect("same bounds");
        self.ok += other.ok;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    /// Records a call that ended at `done` after `took`, if inside `window`.
    pub fn record(
        &mut self,
        window: &Window,
        done: Instant,
        took: Duration,
        result: Result<(), String>,
    ) {
        if done < window.from || done >= window.end {
            return;
        }
        match result {
            Ok(()) => {
                self.ok += 1;
                let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
                self.latency.saturating_record(micros);
            }
            Err(label) => *self.errors.entry(label).or_default() += 1,
        }
    }
}

/// Microseconds, 1 µs to 10 min, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Runs each call in its own task (one call in flight per task) until the
/// window ends, and merges what they measured.
pub async fn drive(calls: Vec<Call>, window: Window) -> Outcome {
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|mut call| {
            tokio::spawn(async move {
                let mut outcome = Outcome::new(window.seconds());
                loop {
                    let start = Instant::now();
                    if start >= window.end {
                        break;
                    }
                    let result = call().await;
                    let done = Instant::now();
                    outcome.record(&window, done, done - start, result);
                }
                outcome
            })
        })
        .collect();
    let mut total = Outcome::new(window.seconds());
    for task in tasks {
        total.merge(&task.await.expect("a driver task"));
    }
    total
}

/// Runs `work` on `threads` OS threads (no async runtime) until the window
/// ends: the ceilings of CPU-bound work.
pub fn on_threads<F>(threads: usize, window: Window, work: F) -> Outcome
where
    F: Fn(usize, u64) -> Result<(), String> + Sync,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                scope.spawn(move || {
                    let mut outcome = Outcome::new(window.seconds());
                    let mut n = 0u64;
                    loop {
                        let start = Instant::now();
                        if start >= window.end {
                            break;
                        }
                        let result = work(t, n);
                        n += 1;
                        let done = Instant::now();
                        outcome.record(&window, done, done - start, result);
                    }
                    outcome
                })
            })
            .collect();
        let mut total = Outcome::new(window.seconds());
        for h in handles {
            total.merge(&h.join().expect("a ceiling thread"));
        }
        total
    })
}

/// A small, fast, deterministic generator (splitmix64) for picking users.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n.max(1) as u64) as usize
    }
}

/// The label of a failed gRPC call.
pub fn code(status: tonic::Status) -> String {
    format!("{:?}", status.code())
}
