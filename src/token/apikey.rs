//! API key secrets: `idk_`, 43 random base62 characters (256 bits), and a
//! 6-character base62 CRC-32 of them, like GitHub's tokens: a secret
//! scanner, or identity before any lookup, can tell a real key from a
//! typo or a truncated paste. The first 12 characters (`idk_` and 8 more)
//! are the key's prefix, kept in clear to find it and to show people; the
//! secret itself is stored only as SHA-256 and compared in constant time.

use sha2::{Digest, Sha256};

/// What every secret starts with.
pub const SCHEME: &str = "idk_";
/// Random characters after the scheme: 43 × log2(62) ≥ 256 bits.
const RANDOM: usize = 43;
/// Checksum characters: 62^6 > 2^32.
const CHECK: usize = 6;
/// Characters of the prefix, the scheme included.
pub const PREFIX: usize = SCHEME.len() + 8;
/// The length of every secret.
pub const LENGTH: usize = SCHEME.len() + RANDOM + CHECK;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A new key's secret, with what the database keeps of it. Its `Debug`
/// hides the secret.
pub struct NewKey {
    /// What the client gets, once.
    pub secret: String,
    /// Its first characters, kept in clear.
    pub prefix: String,
    /// Its SHA-256.
    pub hash: [u8; 32],
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A new secret from the OS's random source.
pub fn generate() -> Result<NewKey, aws_lc_rs::error::Unspecified> {
    let mut random = String::with_capacity(RANDOM);
    let mut bytes = [0u8; 64];
    while random.len() < RANDOM {
        aws_lc_rs::rand::fill(&mut bytes)?;
        // Rejection sampling: 248 = 4 × 62, so every character is equally
        // likely.
        random.extend(
            bytes
                .iter()
                .filter(|b| **b < 248)
                .map(|b| ALPHABET[usize::from(*b % 62)] as char)
                .take(RANDOM - random.len()),
        );
    }
    let secret = format!("{SCHEME}{random}{}", checksum(&random));
    Ok(NewKey {
        prefix: secret[..PREFIX].to_owned(),
        hash: hash(&secret),
        secret,
    })
}

/// The CRC-32 of the random part, in base62, six characters.
fn checksum(random: &str) -> String {
    let mut n = crc32fast::hash(random.as_bytes());
    let mut out = [b'0'; CHECK];
    for c in out.iter_mut().rev() {
        *c = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `credential` is shaped like a key (the scheme), whatever else.
pub fn looks_like_key(credential: &str) -> bool {
    credential.starts_with(SCHEME)
}

/// A presented secret whose shape and checksum are right: its prefix, to
/// find it, and its hash, to compare. `None`: not a key identity made.
pub fn parse(secret: &str) -> Option<(&str, [u8; 32])> {
    let random = secret.strip_prefix(SCHEME)?;
    if secret.len() != LENGTH || !random.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let (random, check) = random.split_at(RANDOM);
    (checksum(random) == check).then(|| (&secret[..PREFIX], hash(secret)))
}

/// The stored form of a secret.
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether a stored hash is the presented one, in constant time.
pub fn matches(stored: &[u8], presented: &[u8; 32]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(stored, presented).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_secret_parses_and_a_changed_one_does_not() {
        let key = generate().unwrap();
        assert_eq!(key.secret.len(), LENGTH);
        assert!(key.secret.starts_with("idk_"));
        assert!(key.secret.starts_with(&key.prefix));
        let (prefix, hash) = parse(&key.secret).expect("a real key parses");
        assert_eq!(prefix, key.prefix);
        assert!(matches(&key.hash, &hash));
        // Any one character changed breaks the checksum.
        for i in SCHEME.len()..LENGTH {
            let mut bytes = key.secret.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert!(parse(&changed).is_none(), "changed at {i} still parses");
        }
        assert!(parse(&key.secret[..LENGTH - 1]).is_none());
        assert!(parse("idk_").is_none());
        assert!(parse("eyJhbGciOi").is_none());
        assert_ne!(generate().unwrap().secret, key.secret);
        assert!(!format!("{key:?}").contains(&key.secret[PREFIX..]));
    }
}
