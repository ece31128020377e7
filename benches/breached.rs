//! `cargo bench --bench breached`: BREACHED_PASSWORDS_FILE at 10 million
//! entries. It writes a list in Have I Been Pwned's format (random SHA-1s
//! with counts: no download), then runs the release-built `identity
//! passwords build` on it and `identity passwords check` on both forms, each
//! in a process of its own whose wall time and peak resident memory (its
//! rusage, as the kernel counted it) are set beside the bars of issue #17:
//! a load under 10 s and under 64 MiB. Then the cost of one lookup, in this
//! process. BREACHED_ENTRIES sets the size; BENCHMARKS.md has the results.
//!
//! Run without `--bench` (`cargo test --bench breached`) it is a smoke run
//! of 100,000 entries that fails if a step fails.

// A harness, not a library.
#![allow(missing_docs)]

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use identity::domain::BreachedList;
use sha1::{Digest, Sha1};

/// Passwords whose SHA-1 the generated list holds among the random ones.
const KNOWN: [&str; 2] = ["tangerine velvet orchestra", "marmalade submarine 1987"];
/// The bars: a load of 10 million entries in under 10 s and 64 MiB.
const BAR_SECONDS: f64 = 10.0;
const BAR_BYTES: u64 = 64 << 20;

fn main() -> ExitCode {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let entries: u64 = std::env::var("BREACHED_ENTRIES")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(if smoke { 100_000 } else { 10_000_000 });
    let scratch = Scratch::new();
    let text = scratch.0.join("pwned-passwords-sha1.txt");
    let built = scratch.0.join("pwned-passwords.bin");
    let empty = scratch.0.join("empty.txt");
    std::fs::write(&empty, "").expect("write the empty list");

    let start = Instant::now();
    generate(&text, entries);
    let size = std::fs::metadata(&text).expect("the list").len();
    println!(
        "generated {entries} entries ({:.0} MiB of text) in {:.1} s",
        size as f64 / f64::from(1 << 20),
        start.elapsed().as_secs_f64()
    );

    let runs = [
        (
            "passwords check (empty list: the binary alone)",
            check(&empty),
        ),
        ("passwords build (text in, built out)", build(&text, &built)),
        ("passwords check (built file)", check(&built)),
        ("passwords check (SHA-1 text)", check(&text)),
    ];
    let built_size = std::fs::metadata(&built).expect("the built list").len();
    println!(
        "built file: {:.1} MiB",
        built_size as f64 / f64::from(1 << 20)
    );
    println!();
    println!("| run | wall | peak RSS | its output |");
    println!("|---|---|---|---|");
    let mut failed = false;
    for (name, run) in &runs {
        println!(
            "| {name} | {:.2} s | {:.1} MiB | {} |",
            run.wall.as_secs_f64(),
            run.peak_rss as f64 / f64::from(1 << 20),
            run.stdout.trim()
        );
        failed |= !run.ok;
    }

    // The cost of a check: a SHA-1 and a binary search in one bucket.
    let (list, _) = BreachedList::load(&built).expect("load the built list");
    assert!(
        KNOWN.iter().all(|p| list.contains(p)),
        "the known passwords are found"
    );
    let probes: Vec<String> = (0..1_000_000)
        .map(|i| format!("a password nobody listed {i}"))
        .collect();
    let start = Instant::now();
    let hits = probes.iter().filter(|p| list.contains(p)).count();
    let per_check = start.elapsed() / probes.len() as u32;
    println!();
    println!(
        "{} lookups of unlisted passwords: {per_check:?} a check, {hits} false positives (expected {:.1e} each: {:.1e} in all)",
        probes.len(),
        list.false_positive_rate(),
        list.false_positive_rate() * probes.len() as f64
    );

    println!();
    println!("Targets (issue #17): {entries} entries");
    for (name, run) in &runs[2..] {
        let fast = run.wall.as_secs_f64() < BAR_SECONDS;
        let small = run.peak_rss < BAR_BYTES;
        println!(
            "  {name}: {:.2} s < 10 s {}, {:.1} MiB < 64 MiB {}",
            run.wall.as_secs_f64(),
            verdict(fast),
            run.peak_rss as f64 / f64::from(1 << 20),
            verdict(small)
        );
        if !smoke {
            failed |= !(fast && small);
        }
    }
    let lookup = per_check < Duration::from_millis(1);
    println!("  a check: {per_check:?} < 1 ms {}", verdict(lookup));
    failed |= !lookup;
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// `entries` lines of `HASH:COUNT` with `\r\n`, random hashes (splitmix64)
/// and counts, the SHA-1s of [`KNOWN`] among them.
fn generate(path: &Path, entries: u64) {
    let mut out = BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).expect("create the list"),
    );
    let mut state: u64 = 0x5EED_0000_0017_0004;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut line = Vec::with_capacity(64);
    for i in 0..entries {
        line.clear();
        let known = match i {
            0 => Some(KNOWN[0]),
            _ if i == entries / 2 => Some(KNOWN[1]),
            _ => None,
        };
        if let Some(known) = known {
            line.extend(
                Sha1::digest(known.as_bytes())
                    .iter()
                    .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]),
            );
        } else {
            let (a, b, c) = (next(), next(), next() as u32);
            for byte in a
                .to_be_bytes()
                .into_iter()
                .chain(b.to_be_bytes())
                .chain(c.to_be_bytes())
            {
                line.push(HEX[usize::from(byte >> 4)]);
                line.push(HEX[usize::from(byte & 15)]);
            }
        }
        write!(line, ":{}\r\n", 1 + next() % 5000).expect("a line");
        out.write_all(&line).expect("write the list");
    }
    out.flush().expect("write the list");
}

/// What one run of the binary took.
struct Run {
    ok: bool,
    wall: Duration,
    /// Peak resident set size, in bytes.
    peak_rss: u64,
    stdout: String,
}

fn build(text: &Path, built: &Path) -> Run {
    run(&["passwords", "build"], &[text, built])
}

fn check(file: &Path) -> Run {
    run(&["passwords", "check"], &[file])
}

/// Runs the release-built `identity` (the binary cargo built beside this
/// bench) and reaps it with `wait4`, which returns its rusage.
fn run(args: &[&str], paths: &[&Path]) -> Run {
    let start = Instant::now();
    #[allow(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, which returns its rusage"
    )]
    let mut child = Command::new(env!("CARGO_BIN_EXE_identity"))
        .args(args)
        .args(paths)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start identity");
    let pid = child.id() as libc::pid_t;
    // SAFETY: wait4 writes into the status and rusage it is given; the
    // child is ours and not waited for elsewhere.
    let (status, usage) = unsafe {
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        let reaped = libc::wait4(pid, &mut status, 0, &mut usage);
        assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
        (status, usage)
    };
    let wall = start.elapsed();
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).expect("read its output");
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        eprintln!("identity {args:?} {paths:?} failed: status {status}");
    }
    Run {
        ok,
        wall,
        // ru_maxrss is in KiB on Linux.
        peak_rss: usage.ru_maxrss as u64 * 1024,
        stdout,
    }
}

/// A folder of its own under the temp folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("identity-breached-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch folder");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
