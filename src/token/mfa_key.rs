//! The key that encrypts TOTP secrets at rest: `MFA_KEY_FILE`, 32 random
//! bytes made on first start with mode 0600, and the keys it replaced,
//! `MFA_PREVIOUS_KEY_FILES`, which still open what they sealed.
//!
//! AES-256-GCM from aws-lc-rs (already linked for TLS and the signing keys),
//! a random 96-bit nonce per seal. A secret is sealed a handful of times per
//! user, far below the 2^32 seals per key that random GCM nonces allow.
//! The caller's `aad` is the user's id, so a sealed secret copied into
//! another user's row does not open there.
//!
//! A sealed blob names its key, so rotation needs no flag day:
//!
//! ```text
//! version (1) | key id (8) | nonce (12) | ciphertext | tag (16)
//! ```
//!
//! The version and key id are authenticated with the caller's `aad`. A key
//! id is the first 8 bytes of the key's SHA-256, shown in hex in logs and
//! errors; the key itself never is. To rotate: move the old file aside,
//! list it in `MFA_PREVIOUS_KEY_FILES`, put a new key in `MFA_KEY_FILE` (or
//! let identity make one), and restart; secrets are resealed with the new
//! key as they are used ([`MfaKeys::needs_reseal`]), and an old key may go
//! once no row names it.
//!
//! A key file readable by group or others is loaded with a warning, not
//! refused: the signing keys beside it are not checked either, and the
//! commonest way to hand a container a secret file, a Kubernetes Secret
//! volume, gives mode 0644 unless told otherwise.

use std::{
    fmt,
    fs::{self, File},
    io::{self, Read, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};

/// Bytes in a key.
pub const KEY_BYTES: usize = 32;
/// The setting that names the current key's file.
pub const KEY_FILE_SETTING: &str = "MFA_KEY_FILE";
/// The setting that lists the previous keys' files.
pub const PREVIOUS_SETTING: &str = "MFA_PREVIOUS_KEY_FILES";

/// The layout's version byte.
const VERSION: u8 = 1;
const KEY_ID_BYTES: usize = 8;
const HEADER_BYTES: usize = 1 + KEY_ID_BYTES;
const TAG_BYTES: usize = 16;

/// Why a key could not be loaded or made, or a secret not sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum MfaKeyError {
    /// A file-system step failed.
    #[error("{setting} {path}: {what}: {source}")]
    Io {
        /// [`KEY_FILE_SETTING`] or [`PREVIOUS_SETTING`].
        setting: &'static str,
        /// On which path.
        path: PathBuf,
        /// Which step.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A key file that is not 32 bytes.
    #[error("{setting} {path}: {len} bytes, expected {KEY_BYTES}")]
    WrongSize {
        /// [`KEY_FILE_SETTING`] or [`PREVIOUS_SETTING`].
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The operating system's random source failed.
    #[error("the random source failed")]
    Random,
    /// aws-lc-rs refused a key or a seal; not expected to happen.
    #[error("AES-256-GCM failed")]
    Crypto,
    /// Bytes that are not a sealed secret of a known layout.
    #[error("a sealed MFA secret is malformed: {0}")]
    Malformed(&'static str),
    /// Sealed with a key that is neither current nor previous.
    #[error(
        "a sealed MFA secret names key {key_id}, which is neither \
         {KEY_FILE_SETTING} nor one of {PREVIOUS_SETTING}"
    )]
    UnknownKey {
        /// The key id the blob names, in hex.
        key_id: String,
    },
    /// The right key, but the tag does not check: altered, or sealed with
    /// another `aad` (for another user).
    #[error("a sealed MFA secret does not open: altered, or sealed for another user")]
    Open,
}

/// One key, ready to seal and open.
struct MfaKey {
    id: [u8; KEY_ID_BYTES],
    aead: RandomizedNonceKey,
}

impl MfaKey {
    fn new(bytes: &[u8; KEY_BYTES]) -> Result<Self, MfaKeyError> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_BYTES]);
        let aead = RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| MfaKeyError::Crypto)?;
        Ok(Self { id, aead })
    }
}

/// The current key, which seals and opens, and the previous ones, which
/// only open. `Debug` shows key ids only.
pub struct MfaKeys {
    current: MfaKey,
    previous: Vec<MfaKey>,
}

impl fmt::Debug for MfaKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MfaKeys")
            .field("key_id", &self.key_id())
            .field("previous_key_ids", &self.previous_key_ids())
            .finish()
    }
}

impl MfaKeys {
    /// Keys with `current` alone.
    pub fn new(current: [u8; KEY_BYTES]) -> Result<Self, MfaKeyError> {
        Ok(Self {
            current: MfaKey::new(&current)?,
            previous: Vec::new(),
        })
    }

    /// Reads the key in `path` ([`KEY_FILE_SETTING`]): exactly 32 raw bytes.
    /// When there is no such file, first makes one of 32 random bytes with
    /// mode 0600 (and its folder, if missing, with mode 0700). Replicas
    /// starting at once on a shared folder agree on one key: a new key is
    /// linked into place only if no file is there yet, and whoever loses
    /// the race reads the winner's.
    pub fn load_or_generate(path: &Path) -> Result<Self, MfaKeyError> {
        let bytes = match read_key_file(path, KEY_FILE_SETTING)? {
            Some(bytes) => bytes,
            None => {
                generate(path)?;
                read_key_file(path, KEY_FILE_SETTING)?.ok_or_else(|| MfaKeyError::Io {
                    setting: KEY_FILE_SETTING,
                    path: path.to_owned(),
                    what: "reading the new key",
                    source: io::ErrorKind::NotFound.into(),
                })?
            }
        };
        let keys = Self::new(bytes)?;
        tracing::info!(path = %path.display(), key_id = %keys.key_id(), "loaded the MFA key");
        Ok(keys)
    }

    /// Adds the keys of `paths` ([`PREVIOUS_SETTING`]) as previous keys;
    /// each file must exist and hold exactly 32 bytes. Nothing is made.
    pub fn load_previous(self, paths: &[PathBuf]) -> Result<Self, MfaKeyError> {
        let mut previous = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes = read_key_file(path, PREVIOUS_SETTING)?.ok_or_else(|| MfaKeyError::Io {
                setting: PREVIOUS_SETTING,
                path: path.clone(),
                what: "reading",
                source: io::ErrorKind::NotFound.into(),
            })?;
            previous.push(bytes);
        }
        self.with_previous(previous)
    }

    /// Adds `previous` keys, which open what they sealed but seal nothing.
    /// A key given twice, or equal to the current one, counts once.
    pub fn with_previous(mut self, previous: Vec<[u8; KEY_BYTES]>) -> Result<Self, MfaKeyError> {
        for bytes in &previous {
            let key = MfaKey::new(bytes)?;
            if self.find(&key.id).is_none() {
                self.previous.push(key);
            }
        }
        Ok(self)
    }

    /// The current key's id, in hex: for logs.
    pub fn key_id(&self) -> String {
        hex(&self.current.id)
    }

    /// The previous keys' ids, in hex, in the order given.
    pub fn previous_key_ids(&self) -> Vec<String> {
        self.previous.iter().map(|k| hex(&k.id)).collect()
    }

    /// Encrypts `plaintext` with the current key, bound to `aad` (the
    /// user's id bytes).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, MfaKeyError> {
        let key = &self.current;
        let mut sealed = Vec::with_capacity(HEADER_BYTES + NONCE_LEN + plaintext.len() + TAG_BYTES);
        sealed.push(VERSION);
        sealed.extend_from_slice(&key.id);
        let mut in_out = plaintext.to_vec();
        let nonce = key
            .aead
            .seal_in_place_append_tag(Aad::from(bound_aad(&sealed, aad)), &mut in_out)
            .map_err(|_| MfaKeyError::Crypto)?;
        sealed.extend_from_slice(nonce.as_ref());
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    /// Decrypts what [`seal`](Self::seal) made, with whichever key sealed it,
    /// given the same `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, MfaKeyError> {
        let id = key_id_of(sealed)?;
        let key = self
            .find(&id)
            .ok_or_else(|| MfaKeyError::UnknownKey { key_id: hex(&id) })?;
        let (header, rest) = sealed.split_at(HEADER_BYTES);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| MfaKeyError::Crypto)?;
        let mut in_out = ciphertext.to_vec();
        let len = key
            .aead
            .open_in_place(nonce, Aad::from(bound_aad(header, aad)), &mut in_out)
            .map_err(|_| MfaKeyError::Open)?
            .len();
        in_out.truncate(len);
        Ok(in_out)
    }

    /// Whether `sealed` was sealed with a previous key, and so should be
    /// sealed again with the current one the next time it is opened. False
    /// for the current key, an unknown key, and bytes that are no sealed
    /// secret (which `open` refuses anyway).
    pub fn needs_reseal(&self, sealed: &[u8]) -> bool {
        key_id_of(sealed).is_ok_and(|id| self.previous.iter().any(|k| k.id == id))
    }

    fn find(&self, id: &[u8; KEY_ID_BYTES]) -> Option<&MfaKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| &k.id == id)
    }
}

/// The key id a sealed blob names, once its version and length check.
fn key_id_of(sealed: &[u8]) -> Result<[u8; KEY_ID_BYTES], MfaKeyError> {
    let Some(&version) = sealed.first() else {
        return Err(MfaKeyError::Malformed("empty"));
    };
    if version != VERSION {
        return Err(MfaKeyError::Malformed("unknown version"));
    }
    if sealed.len() < HEADER_BYTES + NONCE_LEN + TAG_BYTES {
        return Err(MfaKeyError::Malformed("too short"));
    }
    let mut id = [0u8; KEY_ID_BYTES];
    id.copy_from_slice(&sealed[1..HEADER_BYTES]);
    Ok(id)
}

/// The header (version and key id) followed by the caller's `aad`: all of
/// it authenticated.
fn bound_aad(header: &[u8], aad: &[u8]) -> Vec<u8> {
    [header, aad].concat()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key in `path`; `None` if there is no such file.
fn read_key_file(
    path: &Path,
    setting: &'static str,
) -> Result<Option<[u8; KEY_BYTES]>, MfaKeyError> {
    let err = |what: &'static str| {
        move |source| MfaKeyError::Io {
            setting,
            path: path.to_owned(),
            what,
            source,
        }
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err("opening")(e)),
    };
    let meta = file.metadata().map_err(err("reading the metadata of"))?;
    if !meta.is_file() {
        return Err(err("opening")(io::Error::other("not a regular file")));
    }
    if meta.len() != KEY_BYTES as u64 {
        return Err(MfaKeyError::WrongSize {
            setting,
            path: path.to_owned(),
            len: meta.len(),
        });
    }
    let mut bytes = [0u8; KEY_BYTES];
    file.read_exact(&mut bytes).map_err(err("reading"))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            setting,
            path = %path.display(),
            mode = %format!("{mode:04o}"),
            "the MFA key file can be read by group or others; chmod 600 it"
        );
    }
    Ok(Some(bytes))
}

/// Writes 32 random bytes to `path`, mode 0600, unless a file is there by
/// then. The folder is made, mode 0700, if missing.
fn generate(path: &Path) -> Result<(), MfaKeyError> {
    let err = |what: &'static str, at: &Path| {
        let at = at.to_owned();
        move |source| MfaKeyError::Io {
            setting: KEY_FILE_SETTING,
            path: at,
            what,
            source,
        }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(err("creating", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(err("setting the mode of", dir))?;
    }
    let mut bytes = [0u8; KEY_BYTES];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| MfaKeyError::Random)?;
    let mut tag = [0u8; 8];
    aws_lc_rs::rand::fill(&mut tag).map_err(|_| MfaKeyError::Random)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staging = dir.join(format!(".{name}.{}.tmp", hex(&tag)));
    // Written aside, then hard-linked into place: a reader never sees half
    // a key, and unlike a rename the link fails if another process put a
    // key there first, which is then the one everybody reads.
    let written = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(err("creating", &staging))
        .and_then(|mut file| {
            file.write_all(&bytes)
                .and_then(|()| file.sync_all())
                .map_err(err("writing", &staging))
        })
        .and_then(|()| match fs::hard_link(&staging, path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "generated an MFA key");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(err("linking the new key to", path)(e)),
        });
    let _ = fs::remove_file(&staging);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &[u8] = b"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
    const OTHER_USER: &[u8] = b"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c";
    const SECRET: &[u8] = b"twenty bytes secret!";

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("identity-mfa-{}", uuid::Uuid::now_v7()))
    }

    fn keys(byte: u8) -> MfaKeys {
        MfaKeys::new([byte; KEY_BYTES]).unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_for_its_user() {
        let keys = keys(1);
        let sealed = keys.seal(SECRET, USER).unwrap();
        assert_eq!(keys.open(&sealed, USER).unwrap(), SECRET);
        assert_eq!(sealed.len(), 1 + 8 + 12 + SECRET.len() + 16);
        assert_eq!(sealed[0], 1);
        assert_eq!(hex(&sealed[1..9]), keys.key_id());
        assert!(!sealed.windows(SECRET.len()).any(|w| w == SECRET));
        // A fresh nonce each time.
        assert_ne!(keys.seal(SECRET, USER).unwrap(), sealed);
        assert!(!keys.needs_reseal(&sealed));
    }

    #[test]
    fn the_key_id_is_the_start_of_the_keys_sha256() {
        // SHA-256 of 32 zero bytes is 66687aadf862bd77...
        assert_eq!(keys(0).key_id(), "66687aadf862bd77");
    }

    #[test]
    fn another_users_aad_does_not_open_it() {
        let keys = keys(1);
        let sealed = keys.seal(SECRET, USER).unwrap();
        assert!(matches!(
            keys.open(&sealed, OTHER_USER),
            Err(MfaKeyError::Open)
        ));
        assert!(matches!(keys.open(&sealed, b""), Err(MfaKeyError::Open)));
    }

    #[test]
    fn any_altered_byte_is_refused() {
        let keys = keys(1);
        let sealed = keys.seal(SECRET, USER).unwrap();
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x01;
            let error = keys.open(&altered, USER).unwrap_err();
            match i {
                0 => assert!(matches!(error, MfaKeyError::Malformed(_)), "{error}"),
                1..=8 => assert!(matches!(error, MfaKeyError::UnknownKey { .. }), "{error}"),
                _ => assert!(matches!(error, MfaKeyError::Open), "byte {i}: {error}"),
            }
        }
        for len in [0, 1, 9, 36] {
            assert!(matches!(
                keys.open(&sealed[..len], USER),
                Err(MfaKeyError::Malformed(_))
            ));
        }
        // Cut short but long enough to parse: the tag no longer checks.
        assert!(matches!(
            keys.open(&sealed[..sealed.len() - 1], USER),
            Err(MfaKeyError::Open)
        ));
    }

    #[test]
    fn a_previous_key_opens_what_it_sealed_and_asks_for_a_reseal() {
        let old = keys(1);
        let sealed_old = old.seal(SECRET, USER).unwrap();
        let rotated = keys(2).with_previous(vec![[1; KEY_BYTES]]).unwrap();
        assert_eq!(rotated.previous_key_ids(), vec![old.key_id()]);
        assert_eq!(rotated.open(&sealed_old, USER).unwrap(), SECRET);
        assert!(rotated.needs_reseal(&sealed_old));
        let resealed = rotated.seal(SECRET, USER).unwrap();
        assert!(!rotated.needs_reseal(&resealed));
        assert_eq!(hex(&resealed[1..9]), rotated.key_id());
        // The old key alone cannot open what the new one sealed.
        assert!(matches!(
            old.open(&resealed, USER),
            Err(MfaKeyError::UnknownKey { .. })
        ));
        assert!(!rotated.needs_reseal(b"not sealed"));
    }

    #[test]
    fn a_previous_key_equal_to_the_current_one_counts_once() {
        let keys = keys(2)
            .with_previous(vec![[2; KEY_BYTES], [1; KEY_BYTES], [1; KEY_BYTES]])
            .unwrap();
        assert_eq!(keys.previous_key_ids().len(), 1);
        let sealed = keys.seal(SECRET, USER).unwrap();
        assert!(!keys.needs_reseal(&sealed));
    }

    #[test]
    fn an_unknown_key_is_named_in_the_error() {
        let stranger = keys(3);
        let sealed = stranger.seal(SECRET, USER).unwrap();
        let error = keys(1).open(&sealed, USER).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "a sealed MFA secret names key {}, which is neither MFA_KEY_FILE \
                 nor one of MFA_PREVIOUS_KEY_FILES",
                stranger.key_id()
            )
        );
    }

    #[test]
    fn debug_shows_key_ids_only() {
        let keys = keys(7).with_previous(vec![[8; KEY_BYTES]]).unwrap();
        let debug = format!("{keys:?}");
        assert_eq!(
            debug,
            format!(
                "MfaKeys {{ key_id: {:?}, previous_key_ids: {:?} }}",
                keys.key_id(),
                keys.previous_key_ids()
            )
        );
    }

    #[test]
    fn a_missing_key_file_is_made_0600_in_a_0700_folder_and_reloads_the_same() {
        let dir = temp_dir();
        let path = dir.join("keys").join("mfa.key");
        let made = MfaKeys::load_or_generate(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32);
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        // Nothing left aside.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        let sealed = made.seal(SECRET, USER).unwrap();
        let again = MfaKeys::load_or_generate(&path).unwrap();
        assert_eq!(again.key_id(), made.key_id());
        assert_eq!(again.open(&sealed, USER).unwrap(), SECRET);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replicas_starting_together_agree_on_one_key() {
        let dir = temp_dir();
        let path = dir.join("mfa.key");
        let ids: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| MfaKeys::load_or_generate(&path).unwrap().key_id()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_file_of_the_wrong_size_is_refused_by_name() {
        let dir = temp_dir();
        fs::create_dir_all(&dir).unwrap();
        for len in [0, 31, 33, 44] {
            let path = dir.join(format!("mfa-{len}.key"));
            fs::write(&path, vec![b'k'; len]).unwrap();
            let error = MfaKeys::load_or_generate(&path).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("MFA_KEY_FILE {}: {len} bytes, expected 32", path.display())
            );
            // Left as it was.
            assert_eq!(fs::read(&path).unwrap().len(), len);
            let error = keys(1)
                .load_previous(std::slice::from_ref(&path))
                .unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "MFA_PREVIOUS_KEY_FILES {}: {len} bytes, expected 32",
                    path.display()
                )
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn previous_key_files_are_read_and_never_made() {
        let dir = temp_dir();
        let old_path = dir.join("mfa-old.key");
        let old = MfaKeys::load_or_generate(&old_path).unwrap();
        let sealed = old.seal(SECRET, USER).unwrap();

        let current = MfaKeys::load_or_generate(&dir.join("mfa.key"))
            .unwrap()
            .load_previous(std::slice::from_ref(&old_path))
            .unwrap();
        assert_ne!(current.key_id(), old.key_id());
        assert_eq!(current.open(&sealed, USER).unwrap(), SECRET);
        assert!(current.needs_reseal(&sealed));

        let missing = dir.join("gone.key");
        let error = current
            .load_previous(std::slice::from_ref(&missing))
            .unwrap_err();
        assert!(
            error.to_string().starts_with(&format!(
                "MFA_PREVIOUS_KEY_FILES {}: reading:",
                missing.display()
            )),
            "{error}"
        );
        assert!(!missing.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_in_place_of_the_key_file_is_refused() {
        let dir = temp_dir();
        fs::create_dir_all(&dir).unwrap();
        let error = MfaKeys::load_or_generate(&dir).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("MFA_KEY_FILE {}:", dir.display())),
            "{error}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
