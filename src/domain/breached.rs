//! Passwords known from breaches (NIST SP 800-63B 3.1.1.2: refuse
//! "passwords obtained from previous breach corpuses"): the list that
//! `BREACHED_PASSWORDS_FILE` names, in Have I Been Pwned's "Pwned
//! Passwords" SHA-1 format (`HASH:COUNT` lines: the SHA-1 of the password's
//! UTF-8 bytes in 40 hexadecimal digits, any case, a colon, how often it
//! was seen) or as `identity passwords build` converts it.
//!
//! **The structure: a sorted prefix array.** Each SHA-1 is cut to its first
//! 52 bits: the first 20 choose one of 2^20 buckets, the next 32 are kept as
//! a `u32`, sorted within the bucket; a table of 2^20 + 1 `u32` offsets says
//! where each bucket starts. A lookup is one SHA-1, one offset pair and a
//! binary search among about n / 2^20 entries (10 at 10 million): well
//! under a microsecond. Memory is 4 bytes an entry plus 4 MiB (44 MB at 10
//! million entries; about 4 GB for the whole list of close to a billion,
//! which `passwords build --min-count` trims to the most seen).
//!
//! **False positives.** A password not in the list is refused only when the
//! first 52 bits of its SHA-1 equal those of a listed one: for a list of n
//! distinct prefixes, a probability of n / 2^52, 2.2e-9 at 10 million
//! entries (one strong password in 450 million refused by mistake), about
//! 2e-7 for the whole list. Never a false negative: every listed hash is
//! found.
//!
//! I rejected a binary fuse filter: at 8-bit fingerprints (9 bits an entry)
//! it refuses one good password in 256, and its 32-bit form costs as much
//! memory as this array for no lower rate worth having; an array is also
//! simpler to build in two streaming passes, to check when loaded, and to
//! explain. A plain sorted `Vec<u64>` of prefixes would be twice the memory,
//! and sorting it in one pass would need the whole list in memory first.
//!
//! **Building** from the text takes two passes over the file (count per
//! bucket, then place, the offsets serving as the cursors), so memory never
//! goes past the final structure and a buffer, and the input need not be
//! sorted: 1.7 s and 52 MiB of peak memory for 10 million entries
//! (BENCHMARKS.md). Lines
//! may end in `\r\n`; blank lines are skipped; entries whose count is 0
//! (Have I Been Pwned's padding) are dropped; duplicates are kept once. A
//! malformed line stops the load with the file and the line number.
//!
//! **The built file** (little-endian): the magic `IDBREACH`, the format
//! version (`u32`, 1), the bucket bits (`u32`, 20), the entry count (`u64`),
//! the offsets, the entries, and a CRC-32 of everything before it. Loading
//! it reads it straight into the two arrays and checks it (length, CRC,
//! offsets, order): 0.1 s for 10 million entries.

use std::{
    fmt,
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

/// Bits of the SHA-1 that choose the bucket.
const BUCKET_BITS: u32 = 20;
/// How many buckets.
const BUCKETS: usize = 1 << BUCKET_BITS;
/// Bits of the SHA-1 compared: the bucket's and the entry's 32.
const PREFIX_BITS: u32 = BUCKET_BITS + 32;
/// The first bytes of a built file (`I` is not a hexadecimal digit, so no
/// text list starts so).
const MAGIC: &[u8; 8] = b"IDBREACH";
/// The built file's format version.
const VERSION: u32 = 1;
/// Magic, version, bucket bits, entry count.
const HEADER_BYTES: u64 = 8 + 4 + 4 + 8;
/// Reads and writes go through buffers of this size.
const CHUNK_BYTES: usize = 1 << 20;

/// The breached passwords, as a sorted prefix array (see the module's
/// comment). Cloning it is cheap: the arrays are shared. Its `Debug` shows
/// only the size.
#[derive(Clone)]
pub struct BreachedList(Arc<Table>);

struct Table {
    /// Where each bucket starts in `entries`, and the end: 2^20 + 1 values,
    /// or none for the empty list.
    offsets: Box<[u32]>,
    /// Bits 20 to 51 of each SHA-1, sorted and distinct within a bucket.
    entries: Box<[u32]>,
}

/// The two forms a list may take on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    /// `HASH:COUNT` lines, as Have I Been Pwned publishes them.
    Text,
    /// The compact file of `identity passwords build`.
    Built,
}

impl fmt::Display for ListFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "SHA-1 text",
            Self::Built => "built",
        })
    }
}

/// What reading a text list counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextStats {
    /// Lines holding an entry (blank lines not counted).
    pub lines: u64,
    /// Entries whose count reached the minimum (before duplicates are
    /// merged).
    pub kept: u64,
}

/// Why a list could not be loaded or written. Its `Display` is one line
/// that names the file (and the line, for a malformed one).
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A line of a text list is not `HASH:COUNT`.
    #[error("{} line {line}: {why}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line's number, from 1.
        line: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A built file that is damaged or of another version, or a list too
    /// large to hold.
    #[error("{}: {why}", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

impl BreachedList {
    /// No list: nothing is breached.
    pub fn empty() -> Self {
        Self(Arc::new(Table {
            offsets: Box::new([]),
            entries: Box::new([]),
        }))
    }

    /// Whether `password`'s SHA-1 (of its UTF-8 bytes, exactly as given)
    /// is in the list, up to the false-positive rate.
    pub fn contains(&self, password: &str) -> bool {
        !self.0.entries.is_empty() && self.contains_prefix(prefix_of(password))
    }

    /// Whether the 52-bit prefix is listed.
    fn contains_prefix(&self, prefix: u64) -> bool {
        let bucket = (prefix >> 32) as usize;
        let (start, end) = (self.0.offsets[bucket], self.0.offsets[bucket + 1]);
        self.0.entries[start as usize..end as usize]
            .binary_search(&(prefix as u32))
            .is_ok()
    }

    /// Distinct entries (52-bit prefixes) in the list.
    pub fn len(&self) -> usize {
        self.0.entries.len()
    }

    /// Whether the list has no entry.
    pub fn is_empty(&self) -> bool {
        self.0.entries.is_empty()
    }

    /// The chance that a password not in the list is taken for one that
    /// is: its 52-bit prefix equal to one of the `len()` listed.
    pub fn false_positive_rate(&self) -> f64 {
        self.len() as f64 / 2f64.powi(PREFIX_BITS as i32)
    }

    /// Loads a list in either form, told apart by the built file's magic.
    /// A text list keeps every entry seen at least once.
    pub fn load(path: &Path) -> Result<(Self, ListFormat), ListError> {
        match format_of(path)? {
            ListFormat::Built => Ok((Self::read_built(path)?, ListFormat::Built)),
            ListFormat::Text => Ok((Self::read_text(path, 1)?.0, ListFormat::Text)),
        }
    }

    /// Reads a text list of `HASH:COUNT` lines, in any order, keeping the
    /// entries seen at least `min_count` times, in two passes over the file.
    pub fn read_text(path: &Path, min_count: u64) -> Result<(Self, TextStats), ListError> {
        let unusable = |why: &str| ListError::Unusable {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        // First pass: how many entries each bucket gets, counted in
        // `offsets[b + 1]`, then summed so that `offsets[b]` is where bucket
        // `b` starts. (No bucket can wrap if the total fits in a u32.)
        let mut offsets = vec![0u32; BUCKETS + 1];
        let (stats, first) = each_entry(path, min_count, |batch| {
            for prefix in batch {
                let count = &mut offsets[(prefix >> 32) as usize + 1];
                *count = count.wrapping_add(1);
            }
        })?;
        let total = u32::try_from(stats.kept).map_err(|_| unusable(TOO_MANY))?;
        for b in 0..BUCKETS {
            offsets[b + 1] += offsets[b];
        }
        // Second pass: each entry into its bucket, `offsets[b]` serving as
        // the bucket's cursor, so that it ends where the next one starts.
        let mut entries = vec![0u32; total as usize];
        let mut overflow = false;
        let (again, second) = each_entry(path, min_count, |batch| {
            for prefix in batch {
                let cursor = &mut offsets[(prefix >> 32) as usize];
                match entries.get_mut(*cursor as usize) {
                    Some(entry) => *entry = *prefix as u32,
                    None => overflow = true,
                }
                *cursor = cursor.wrapping_add(1);
            }
        })?;
        if overflow || again != stats || second != first {
            return Err(unusable(
                "the file changed while it was read: load it again",
            ));
        }
        offsets.copy_within(..BUCKETS, 1);
        offsets[0] = 0;
        // Sort each bucket and keep each entry once, moving the buckets down
        // over the gaps that duplicates leave.
        let mut write = 0usize;
        for b in 0..BUCKETS {
            let (start, end) = (offsets[b] as usize, offsets[b + 1] as usize);
            offsets[b] = write as u32;
            entries[start..end].sort_unstable();
            for i in start..end {
                if i == start || entries[i] != entries[i - 1] {
                    entries[write] = entries[i];
                    write += 1;
                }
            }
        }
        offsets[BUCKETS] = write as u32;
        entries.truncate(write);
        Ok((
            Self(Arc::new(Table {
                offsets: offsets.into_boxed_slice(),
                entries: entries.into_boxed_slice(),
            })),
            stats,
        ))
    }

    /// Reads a file written by [`BreachedList::write_built`], checking its
    /// length, CRC-32, offsets and order, so that a damaged file fails the
    /// start instead of answering wrongly.
    pub fn read_built(path: &Path) -> Result<Self, ListError> {
        let io = |source| ListError::Io {
            path: path.to_owned(),
            source,
        };
        let bad = |why: String| ListError::Unusable {
            path: path.to_owned(),
            why,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut file = BufReader::with_capacity(CHUNK_BYTES, file);
        let mut crc = crc32fast::Hasher::new();
        let mut header = [0u8; HEADER_BYTES as usize];
        file.read_exact(&mut header)
            .map_err(|_| bad("too short for a built list".into()))?;
        crc.update(&header);
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        if &header[..8] != MAGIC {
            return Err(bad("not a built list (no IDBREACH header)".into()));
        }
        if word(8) != VERSION {
            return Err(bad(format!(
                "a built list of format {} (this identity reads {VERSION}): build it again with this identity's `passwords build`",
                word(8)
            )));
        }
        if word(12) != BUCKET_BITS {
            return Err(bad(format!("{} bucket bits, not {BUCKET_BITS}", word(12))));
        }
        let count = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        if count > u64::from(u32::MAX) {
            return Err(bad(format!("{count} entries: damaged, build it again")));
        }
        let expected = HEADER_BYTES + 4 * (BUCKETS as u64 + 1) + 4 * count + 4;
        if size != expected {
            return Err(bad(format!(
                "{size} bytes where its header promises {expected}: truncated or damaged, build it again"
            )));
        }
        let offsets = read_u32s(&mut file, &mut crc, BUCKETS + 1).map_err(io)?;
        let entries = read_u32s(&mut file, &mut crc, count as usize).map_err(io)?;
        let mut stored = [0u8; 4];
        file.read_exact(&mut stored).map_err(io)?;
        if u32::from_le_bytes(stored) != crc.finalize() {
            return Err(bad(
                "its checksum does not match: damaged, build it again".into()
            ));
        }
        // Checksummed, yet checked: a wrong order would make lookups miss.
        if offsets[0] != 0 || u64::from(offsets[BUCKETS]) != count {
            return Err(bad("its offsets do not cover its entries".into()));
        }
        for b in 0..BUCKETS {
            let (start, end) = (offsets[b], offsets[b + 1]);
            if start > end
                || !entries[start as usize..end as usize]
                    .windows(2)
                    .all(|w| w[0] < w[1])
            {
                return Err(bad(format!("bucket {b} is not in order")));
            }
        }
        Ok(Self(Arc::new(Table {
            offsets: offsets.into_boxed_slice(),
            entries: entries.into_boxed_slice(),
        })))
    }

    /// Writes the built form to `out`.
    pub fn write_built(&self, out: impl Write) -> io::Result<()> {
        let mut out = BufWriter::with_capacity(CHUNK_BYTES, out);
        let mut crc = crc32fast::Hasher::new();
        let mut header = Vec::with_capacity(HEADER_BYTES as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&BUCKET_BITS.to_le_bytes());
        header.extend_from_slice(&(self.len() as u64).to_le_bytes());
        crc.update(&header);
        out.write_all(&header)?;
        let zeros;
        let offsets: &[u32] = if self.0.offsets.is_empty() {
            zeros = vec![0u32; BUCKETS + 1];
            &zeros
        } else {
            &self.0.offsets
        };
        write_u32s(&mut out, &mut crc, offsets)?;
        write_u32s(&mut out, &mut crc, &self.0.entries)?;
        out.write_all(&crc.finalize().to_le_bytes())?;
        out.flush()
    }

    /// Writes the built form to `path` atomically: into a new file beside
    /// it, synced, then renamed over `path`, so that a service starting
    /// meanwhile reads the old list or the new one, never half of one.
    pub fn write_built_file(&self, path: &Path) -> Result<(), ListError> {
        let io = |source| ListError::Io {
            path: path.to_owned(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| io(io::Error::other("not a file name")))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let written = (|| {
            let file = File::options().write(true).create_new(true).open(&temp)?;
            self.write_built(&file)?;
            file.sync_all()?;
            std::fs::rename(&temp, path)?;
            // The rename itself outlives a crash once the folder is synced.
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written.map_err(io)
    }
}

#[cfg(test)]
impl BreachedList {
    /// A list of these passwords, made in memory: for tests.
    pub(crate) fn of_passwords(passwords: &[&str]) -> Self {
        let mut prefixes: Vec<u64> = passwords.iter().map(|p| prefix_of(p)).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        let mut offsets = vec![0u32; BUCKETS + 1];
        for p in &prefixes {
            offsets[(p >> 32) as usize + 1] += 1;
        }
        for b in 0..BUCKETS {
            offsets[b + 1] += offsets[b];
        }
        Self(Arc::new(Table {
            offsets: offsets.into_boxed_slice(),
            entries: prefixes.iter().map(|p| *p as u32).collect(),
        }))
    }
}

impl fmt::Debug for BreachedList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreachedList")
            .field("entries", &self.len())
            .finish()
    }
}

impl Default for BreachedList {
    fn default() -> Self {
        Self::empty()
    }
}

/// The first 52 bits of the SHA-1 of `password`'s UTF-8 bytes. SHA-1 from
/// aws-lc-rs, already linked for the tokens' signatures: no crate of its own.
fn prefix_of(password: &str) -> u64 {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        password.as_bytes(),
    );
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first) >> (64 - PREFIX_BITS)
}

/// Why a list cannot be held: offsets are `u32`.
const TOO_MANY: &str = "more than 4,294,967,295 entries: raise --min-count";

/// Which form the file at `path` is in, from its first bytes.
pub fn format_of(path: &Path) -> Result<ListFormat, ListError> {
    let mut start = [0u8; 8];
    let mut file = File::open(path).map_err(|source| ListError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut read = 0;
    while read < start.len() {
        match file.read(&mut start[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ListError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(if &start == MAGIC {
        ListFormat::Built
    } else {
        ListFormat::Text
    })
}

/// Entries handed to the callback of [`each_entry`] at once: its loop over
/// them is tight enough for the processor to overlap their cache misses
/// (the buckets are random), which parsing between them would prevent.
const BATCH: usize = 1024;

/// Calls `each` with the 52-bit prefixes of the entries of the text list at
/// `path` seen at least `min_count` times, in file order, in batches; a
/// malformed line stops it with the line's number. Returns what it counted
/// and a fingerprint of the prefixes it handed over (a sum of their
/// mixed bits, order aside), by which a second pass knows it read the same.
fn each_entry(
    path: &Path,
    min_count: u64,
    mut each: impl FnMut(&[u64]),
) -> Result<(TextStats, u64), ListError> {
    let io = |source| ListError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut stats = TextStats::default();
    let mut fingerprint = 0u64;
    let mut batch = Vec::with_capacity(BATCH);
    let mut number = 0u64;
    let mut line = |text: &[u8], batch: &mut Vec<u64>| -> Result<(), ListError> {
        number += 1;
        let mut text = text;
        if number == 1 {
            // A byte-order mark, as some Windows tools write.
            text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
        }
        let text = text.trim_ascii();
        if text.is_empty() {
            return Ok(());
        }
        let (prefix, count) = parse_line(text).map_err(|why| ListError::Line {
            path: path.to_owned(),
            line: number,
            why,
        })?;
        stats.lines += 1;
        if count >= min_count {
            stats.kept += 1;
            fingerprint = fingerprint.wrapping_add(mix(prefix));
            batch.push(prefix);
            if batch.len() == BATCH {
                each(batch);
                batch.clear();
            }
        }
        Ok(())
    };
    // Lines are cut from large reads, not read one by one.
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut filled = 0;
    loop {
        let read = match file.read(&mut buffer[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        filled += read;
        let mut start = 0;
        while let Some(end) = buffer[start..filled].iter().position(|&b| b == b'\n') {
            line(&buffer[start..start + end], &mut batch)?;
            start += end + 1;
        }
        if read == 0 {
            // The last line, without its newline.
            if start < filled {
                line(&buffer[start..filled], &mut batch)?;
            }
            break;
        }
        buffer.copy_within(start..filled, 0);
        filled -= start;
        if filled == buffer.len() {
            return Err(ListError::Line {
                path: path.to_owned(),
                line: number + 1,
                why: "longer than 1 MiB: not a list of HASH:COUNT lines".to_owned(),
            });
        }
    }
    each(&batch);
    Ok((stats, fingerprint))
}

/// Spreads a prefix's bits (splitmix64's finaliser), for the fingerprint.
fn mix(prefix: u64) -> u64 {
    let mut z = prefix.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The value of each hexadecimal digit; 0xFF for any other byte. A table
/// rather than a match: the digits of random hashes defeat the branch
/// predictor.
const HEX_VALUE: [u8; 256] = {
    let mut table = [0xFF; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// `HASH:COUNT`, trimmed: the hash's first 52 bits and the count.
fn parse_line(text: &[u8]) -> Result<(u64, u64), String> {
    const SHAPE: &str = "expected HASH:COUNT, the SHA-1 of a password in 40 hexadecimal digits, a colon and how often it was seen";
    if text.len() > 41 && text[40] == b':' {
        // The usual line: no search for the colon.
        let (mut prefix, mut invalid) = (0u64, 0u8);
        for &b in &text[..(PREFIX_BITS / 4) as usize] {
            let v = HEX_VALUE[usize::from(b)];
            invalid |= v;
            prefix = prefix << 4 | u64::from(v & 0xF);
        }
        for &b in &text[(PREFIX_BITS / 4) as usize..40] {
            invalid |= HEX_VALUE[usize::from(b)];
        }
        if invalid & 0x80 == 0 {
            let mut count = 0u64;
            for &b in &text[41..] {
                if !b.is_ascii_digit() {
                    return Err(format!("{SHAPE} (the count is not a whole number)"));
                }
                count = count
                    .checked_mul(10)
                    .and_then(|c| c.checked_add(u64::from(b - b'0')))
                    .ok_or_else(|| format!("{SHAPE} (the count is too large)"))?;
            }
            return Ok((prefix, count));
        }
    }
    // Something is wrong: say what.
    let Some(colon) = text.iter().position(|&b| b == b':') else {
        return Err(format!("{SHAPE} (no colon)"));
    };
    let hash = &text[..colon];
    if let Some(&b) = hash.iter().find(|&&b| HEX_VALUE[usize::from(b)] == 0xFF) {
        return Err(format!(
            "{SHAPE} ({:?} is not a hexadecimal digit)",
            char::from(b)
        ));
    }
    if hash.len() != 40 {
        let hint = match hash.len() {
            32 => ": an NTLM hash? Download the SHA-1 list",
            35 => {
                ": a hash without its first 5 digits, as a range file holds them? Prefix each line with its range"
            }
            _ => "",
        };
        return Err(format!("{SHAPE} (a hash of {} digits{hint})", hash.len()));
    }
    Err(format!("{SHAPE} (the count is not a whole number)"))
}

/// Reads `n` little-endian `u32`s, adding their bytes to `crc`.
fn read_u32s(from: &mut impl Read, crc: &mut crc32fast::Hasher, n: usize) -> io::Result<Vec<u32>> {
    let mut values = Vec::with_capacity(n);
    let mut buffer = vec![0u8; CHUNK_BYTES];
    while values.len() < n {
        let take = (n - values.len()).min(CHUNK_BYTES / 4) * 4;
        let chunk = &mut buffer[..take];
        from.read_exact(chunk)?;
        crc.update(chunk);
        values.extend(
            chunk
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(values)
}

/// Writes `values` little-endian, adding their bytes to `crc`.
fn write_u32s(to: &mut impl Write, crc: &mut crc32fast::Hasher, values: &[u32]) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(CHUNK_BYTES);
    for chunk in values.chunks(CHUNK_BYTES / 4) {
        buffer.clear();
        for v in chunk {
            buffer.extend_from_slice(&v.to_le_bytes());
        }
        crc.update(&buffer);
        to.write_all(&buffer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha1::{Digest, Sha1};

    /// SHA-1 in uppercase hexadecimal, from RustCrypto's `sha1` (the list
    /// hashes with aws-lc-rs): the form Have I Been Pwned publishes.
    fn sha1_hex(password: &str) -> String {
        Sha1::digest(password.as_bytes())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    /// A file in a folder of its own, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "identity-breached-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const LISTED: [&str; 4] = [
        "tangerine velvet orchestra",
        "marmalade submarine 1987",
        "password",
        "ünïcödé pässwörd",
    ];

    fn listing(passwords: &[&str]) -> String {
        passwords
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}:{}\r\n", sha1_hex(p), i + 1))
            .collect()
    }

    #[test]
    fn the_sha1_is_of_the_password_as_given() {
        // Have I Been Pwned's own example.
        assert_eq!(
            sha1_hex("password"),
            "5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8"
        );
        let scratch = Scratch::new();
        let path = scratch.file(
            "one.txt",
            "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8:10434004\n",
        );
        let (list, format) = BreachedList::load(&path).unwrap();
        assert_eq!(format, ListFormat::Text);
        assert!(list.contains("password"));
        // Exactly as given: not trimmed, not case folded.
        assert!(!list.contains("Password"));
        assert!(!list.contains("password "));
    }

    #[test]
    fn listed_passwords_are_found_and_others_are_not() {
        let scratch = Scratch::new();
        // Unsorted, with duplicates, blank lines, spaces, both line endings
        // and no newline at the end.
        let mut text = String::from("\r\n");
        text.push_str(&listing(&LISTED));
        text.push('\n');
        text.push_str(&format!("  {}:3  \n", sha1_hex(LISTED[0])));
        text.push_str(&format!("{}:2", sha1_hex(LISTED[1]).to_lowercase()));
        let path = scratch.file("list.txt", &text);
        let (list, stats) = BreachedList::read_text(&path, 1).unwrap();
        assert_eq!(stats, TextStats { lines: 6, kept: 6 });
        assert_eq!(list.len(), LISTED.len());
        for p in LISTED {
            assert!(list.contains(p), "{p}");
        }
        for p in ["gravel lantern oyster", "Password", "", "tangerine"] {
            assert!(!list.contains(p), "{p}");
        }
    }

    #[test]
    fn many_entries_in_any_order_are_all_found() {
        let scratch = Scratch::new();
        let passwords: Vec<String> = (0..5000).map(|i| format!("pass phrase {i}")).collect();
        let mut lines: Vec<String> = passwords
            .iter()
            .map(|p| format!("{}:1", sha1_hex(p)))
            .collect();
        lines.reverse();
        let path = scratch.file("many.txt", &lines.join("\n"));
        let (list, _) = BreachedList::load(&path).unwrap();
        assert_eq!(list.len(), 5000);
        assert!(passwords.iter().all(|p| list.contains(p)));
        assert!((0..5000).all(|i| !list.contains(&format!("other phrase {i}"))));
        assert!((list.false_positive_rate() - 5000.0 / 2f64.powi(52)).abs() < 1e-18);
    }

    #[test]
    fn an_empty_list_holds_nothing() {
        let scratch = Scratch::new();
        let path = scratch.file("empty.txt", "\n\r\n");
        let (list, format) = BreachedList::load(&path).unwrap();
        assert_eq!(format, ListFormat::Text);
        assert!(list.is_empty());
        assert!(!list.contains("password"));
        assert!(!BreachedList::empty().contains("password"));
        // Built, and read back.
        let built = scratch.0.join("empty.bin");
        list.write_built_file(&built).unwrap();
        let (again, format) = BreachedList::load(&built).unwrap();
        assert_eq!(format, ListFormat::Built);
        assert!(again.is_empty() && !again.contains("password"));
        BreachedList::empty().write_built_file(&built).unwrap();
        assert!(BreachedList::read_built(&built).unwrap().is_empty());
    }

    #[test]
    fn the_minimum_count_and_padding_drop_entries() {
        let scratch = Scratch::new();
        let text = format!(
            "{}:0\n{}:5\n{}:50\n",
            sha1_hex(LISTED[0]),
            sha1_hex(LISTED[1]),
            sha1_hex(LISTED[2])
        );
        let path = scratch.file("counts.txt", &text);
        let (list, _) = BreachedList::load(&path).unwrap();
        assert!(!list.contains(LISTED[0]), "a count of 0 is padding");
        assert!(list.contains(LISTED[1]) && list.contains(LISTED[2]));
        let (list, stats) = BreachedList::read_text(&path, 10).unwrap();
        assert_eq!(stats, TextStats { lines: 3, kept: 1 });
        assert!(!list.contains(LISTED[1]) && list.contains(LISTED[2]));
    }

    #[test]
    fn a_malformed_line_names_the_file_and_its_number() {
        let scratch = Scratch::new();
        let good = sha1_hex(LISTED[0]);
        for (bad, hint) in [
            (good.clone(), "no colon"),
            (format!("{good}:"), "not a whole number"),
            (format!("{good}:many"), "not a whole number"),
            (format!("{good}:-1"), "not a whole number"),
            (format!("{good}:99999999999999999999999"), "too large"),
            (format!("{}:1", &good[..39]), "39 digits"),
            (format!("{}:1", &good[5..]), "range"),
            ("8846F7EAEE8FB117AD06BDD830B7586C:1".to_owned(), "NTLM"),
            (format!("{}G:1", &good[..39]), "'G'"),
            (format!("{good} 1"), "no colon"),
        ] {
            let path = scratch.file("bad.txt", &format!("{good}:1\r\n\r\n{bad}\r\n{good}:2\r\n"));
            let e = BreachedList::load(&path).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{} line 3: ", path.display())),
                "{bad}: {e}"
            );
            assert!(e.contains(hint), "{bad}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let missing = scratch.0.join("missing.txt");
        let e = BreachedList::load(&missing).unwrap_err().to_string();
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
    }

    #[test]
    fn both_forms_hold_the_same_list() {
        let scratch = Scratch::new();
        let text = scratch.file("list.txt", &listing(&LISTED));
        let (list, _) = BreachedList::load(&text).unwrap();
        let built = scratch.0.join("list.bin");
        list.write_built_file(&built).unwrap();
        assert_eq!(format_of(&built).unwrap(), ListFormat::Built);
        let (again, format) = BreachedList::load(&built).unwrap();
        assert_eq!(format, ListFormat::Built);
        assert_eq!(again.0.offsets, list.0.offsets);
        assert_eq!(again.0.entries, list.0.entries);
        assert!(LISTED.iter().all(|p| again.contains(p)));
        assert_eq!(
            std::fs::metadata(&built).unwrap().len(),
            HEADER_BYTES + 4 * (BUCKETS as u64 + 1) + 4 * LISTED.len() as u64 + 4
        );
        // Over an existing file, leaving no temporary file behind.
        list.write_built_file(&built).unwrap();
        assert_eq!(std::fs::read_dir(&scratch.0).unwrap().count(), 2);
    }

    #[test]
    fn a_damaged_built_file_is_refused() {
        let scratch = Scratch::new();
        let text = scratch.file("list.txt", &listing(&LISTED));
        let (list, _) = BreachedList::load(&text).unwrap();
        let built = scratch.0.join("list.bin");
        list.write_built_file(&built).unwrap();
        let bytes = std::fs::read(&built).unwrap();

        let mut flipped = bytes.clone();
        let last_entry = bytes.len() - 5;
        flipped[last_entry] ^= 1;
        std::fs::write(&built, &flipped).unwrap();
        let e = BreachedList::load(&built).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");

        std::fs::write(&built, &bytes[..bytes.len() - 1]).unwrap();
        let e = BreachedList::load(&built).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        let mut newer = bytes.clone();
        newer[8] = 2;
        std::fs::write(&built, &newer).unwrap();
        let e = BreachedList::load(&built).unwrap_err().to_string();
        assert!(e.contains("format 2"), "{e}");

        std::fs::write(&built, &bytes[..10]).unwrap();
        assert!(BreachedList::load(&built).is_err());
    }

    #[test]
    fn its_debug_shows_only_the_size() {
        let scratch = Scratch::new();
        let text = scratch.file("list.txt", &listing(&LISTED));
        let (list, _) = BreachedList::load(&text).unwrap();
        assert_eq!(format!("{list:?}"), "BreachedList { entries: 4 }");
    }
}
