//! Signing keys: PKCS#8 PEM files in `KEYS_DIR`, one key a file, named
//! `<UTC time>-<algorithm>.pem` so that names sort by age.
//!
//! The newest key of the configured algorithm signs; every key verifies, so
//! that a rotation never breaks tokens already out. A key's id (`kid`) is its
//! RFC 7638 JWK thumbprint. Private key files are written with mode 0600.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use aws_lc_rs::{
    encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der},
    rsa::KeySize,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair},
};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey,
    jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, ThumbprintHash},
};

use crate::config::JwtAlgorithm;

/// Why keys could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file-system step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not a key identity can use.
    #[error("{path}: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Key generation failed.
    #[error("generating a {0} key failed")]
    Generate(JwtAlgorithm),
    /// No key, and none may be generated.
    #[error("no signing key in {0}")]
    Empty(PathBuf),
}

/// A key, as loaded from its file.
#[derive(Clone)]
pub struct Key {
    /// RFC 7638 thumbprint (SHA-256, base64url).
    pub kid: String,
    /// Its JWS algorithm.
    pub algorithm: Algorithm,
    /// The public key, SubjectPublicKeyInfo in PEM.
    pub public_pem: String,
    /// The public key as a JWK, with `kid`, `alg` and `use`.
    pub jwk: Jwk,
    /// The file it came from.
    pub path: PathBuf,
    /// When it was made: the time in its file name, else the file's mtime.
    pub created: chrono::DateTime<chrono::Utc>,
    pub(crate) encoding: EncodingKey,
    pub(crate) decoding: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Every key of `KEYS_DIR`, and which one signs.
#[derive(Debug, Clone)]
pub struct KeyStore {
    /// The signing key first, then the others, newest first.
    keys: Vec<Key>,
    by_kid: HashMap<String, usize>,
    jwks_json: String,
}

/// The JWS algorithm of a setting.
pub fn algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::Es256 => Algorithm::ES256,
    }
}

/// The JWS name (RFC 7518 `alg`) of `alg`, as GetPublicKeys shows it:
/// "EdDSA", "RS256", "ES256" for the keys identity reads. Written out rather
/// than taken from `Debug`, which is no contract.
pub fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::EdDSA => "EdDSA",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES384 => "ES384",
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        // jsonwebtoken's enum is non-exhaustive; read_key makes none other.
        _ => "unknown",
    }
}

/// The name of a new key file of `alg` made at `stamp`:
/// `<UTC time>-<eddsa|rs256|es256>.pem`.
fn key_file_name(stamp: &str, alg: JwtAlgorithm) -> String {
    format!("{stamp}-{}.pem", alg.as_str().to_ascii_lowercase())
}

impl KeyStore {
    /// Loads `dir`; when it holds no key of `alg` (first start, or a new
    /// algorithm), generates one first.
    pub fn load_or_generate(
        dir: &Path,
        alg: JwtAlgorithm,
        activation_delay: std::time::Duration,
    ) -> Result<Self, KeyError> {
        let keys = read_keys(dir)?;
        if !keys.iter().any(|k| k.algorithm == algorithm(alg)) {
            let path = generate(dir, alg)?;
            tracing::info!(path = %path.display(), "generated a signing key");
        }
        Self::load(dir, alg, activation_delay)
    }

    /// Loads `dir` without writing anything. Every key verifies at once; a
    /// new key signs only once it is `activation_delay` old (from the time
    /// in its name), so that by then every replica has loaded it and every
    /// verifier's cached JWKS holds it. Until one is that old, the newest
    /// key of `alg` signs.
    pub fn load(
        dir: &Path,
        alg: JwtAlgorithm,
        activation_delay: std::time::Duration,
    ) -> Result<Self, KeyError> {
        let mut keys = read_keys(dir)?;
        // Newest first; the signing key to the front.
        keys.reverse();
        let ripe = chrono::Utc::now()
            - chrono::Duration::from_std(activation_delay).unwrap_or(chrono::Duration::MAX);
        let of_alg = |k: &Key| k.algorithm == algorithm(alg);
        let signer = keys
            .iter()
            .position(|k| of_alg(k) && k.created <= ripe)
            .or_else(|| keys.iter().position(of_alg))
            .ok_or_else(|| KeyError::Empty(dir.to_owned()))?;
        let signing = keys.remove(signer);
        keys.insert(0, signing);
        let by_kid = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.kid.clone(), i))
            .collect();
        let set = JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        let jwks_json = serde_json::to_string(&set).map_err(|e| KeyError::BadKey {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            keys,
            by_kid,
            jwks_json,
        })
    }

    /// The key that signs new tokens.
    pub fn signing(&self) -> &Key {
        &self.keys[0]
    }

    /// Every key, the signing key first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The key with this `kid`.
    pub fn find(&self, kid: &str) -> Option<&Key> {
        self.by_kid.get(kid).map(|&i| &self.keys[i])
    }

    /// The public keys as a JSON Web Key Set (RFC 7517).
    pub fn jwks_json(&self) -> &str {
        &self.jwks_json
    }
}

/// Writes a new private key of `alg` into `dir` (created with mode 0700 if
/// missing); returns its path. It becomes the signing key at the next load.
pub fn generate(dir: &Path, alg: JwtAlgorithm) -> Result<PathBuf, KeyError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io("setting the mode of", dir))?;
    }
    let der: Vec<u8> = match alg {
        JwtAlgorithm::EdDsa => {
            let pair = Ed25519KeyPair::generate().map_err(|_| KeyError::Generate(alg))?;
            AsDer::<Pkcs8V1Der>::as_der(&pair)
                .map_err(|_| KeyError::Generate(alg))?
                .as_ref()
                .to_vec()
        }
        JwtAlgorithm::Es256 => {
            let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                .map_err(|_| KeyError::Generate(alg))?;
            pair.to_pkcs8v1()
                .map_err(|_| KeyError::Generate(alg))?
                .as_ref()
                .to_vec()
        }
        JwtAlgorithm::Rs256 => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048)
                .map_err(|_| KeyError::Generate(alg))?;
            AsDer::<Pkcs8V1Der>::as_der(&pair)
                .map_err(|_| KeyError::Generate(alg))?
                .as_ref()
                .to_vec()
        }
    };
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    let name = key_file_name(&stamp.to_string(), alg);
    let path = dir.join(&name);
    // Written aside and renamed into place, so that a reload (or another
    // replica) never reads half a key.
    let staging = dir.join(format!(".{name}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(io("creating", &staging))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("writing", &staging))?;
    fs::rename(&staging, &path).map_err(io("renaming", &staging))?;
    Ok(path)
}

/// Every key file of `dir`, oldest first (by name).
fn read_keys(dir: &Path) -> Result<Vec<Key>, KeyError> {
    let mut paths: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io("reading", dir)(e)),
    };
    paths.sort();
    paths.iter().map(|p| read_key(p)).collect()
}

fn read_key(path: &Path) -> Result<Key, KeyError> {
    let bad = |reason: &str| KeyError::BadKey {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let text = fs::read(path).map_err(io("reading", path))?;
    let block = pem::parse(&text).map_err(|e| bad(&format!("not PEM: {e}")))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(bad("expected a PKCS#8 \"PRIVATE KEY\""));
    }
    let der = block.contents();
    let (algorithm, public_der, encoding) =
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let spki = AsDer::<PublicKeyX509Der>::as_der(pair.public_key())
                .map_err(|_| bad("Ed25519 public key"))?;
            (
                Algorithm::EdDSA,
                spki.as_ref().to_vec(),
                EncodingKey::from_ed_pem(&text),
            )
        } else if let Ok(pair) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
        {
            let spki = AsDer::<PublicKeyX509Der>::as_der(pair.public_key())
                .map_err(|_| bad("P-256 public key"))?;
            (
                Algorithm::ES256,
                spki.as_ref().to_vec(),
                EncodingKey::from_ec_pem(&text),
            )
        } else if let Ok(pair) = aws_lc_rs::rsa::KeyPair::from_pkcs8(der) {
            let spki = AsDer::<PublicKeyX509Der>::as_der(pair.public_key())
                .map_err(|_| bad("RSA public key"))?;
            (
                Algorithm::RS256,
                spki.as_ref().to_vec(),
                EncodingKey::from_rsa_pem(&text),
            )
        } else {
            return Err(bad("not an Ed25519, P-256 or RSA private key"));
        };
    let encoding = encoding.map_err(|e| bad(&format!("private key: {e}")))?;
    let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", public_der.clone()));
    let decoding = match algorithm {
        Algorithm::EdDSA => DecodingKey::from_ed_pem(public_pem.as_bytes()),
        Algorithm::ES256 => DecodingKey::from_ec_pem(public_pem.as_bytes()),
        _ => DecodingKey::from_rsa_pem(public_pem.as_bytes()),
    }
    .map_err(|e| bad(&format!("public key: {e}")))?;
    let mut jwk =
        Jwk::from_encoding_key(&encoding, algorithm).map_err(|e| bad(&format!("JWK: {e}")))?;
    let kid = jwk
        .thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| bad(&format!("thumbprint: {e}")))?;
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(match algorithm {
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        _ => KeyAlgorithm::RS256,
    });
    let created = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('-').next())
        .and_then(|stamp| chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.fZ").ok())
        .map(|t| t.and_utc())
        .or_else(|| {
            fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .map(chrono::DateTime::<chrono::Utc>::from)
        })
        .unwrap_or_default();
    Ok(Key {
        kid,
        algorithm,
        public_pem,
        jwk,
        created,
        path: path.to_owned(),
        encoding,
        decoding,
    })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyError {
    let path = path.to_owned();
    move |source| KeyError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_and_key_files_carry_the_documented_names() {
        for (alg, name, file) in [
            (
                JwtAlgorithm::EdDsa,
                "EdDSA",
                "20261126T100000.000000Z-eddsa.pem",
            ),
            (
                JwtAlgorithm::Rs256,
                "RS256",
                "20261126T100000.000000Z-rs256.pem",
            ),
            (
                JwtAlgorithm::Es256,
                "ES256",
                "20261126T100000.000000Z-es256.pem",
            ),
        ] {
            assert_eq!(algorithm_name(algorithm(alg)), name);
            assert_eq!(key_file_name("20261126T100000.000000Z", alg), file);
        }
    }

    #[test]
    fn a_generated_key_reads_back_under_its_name() {
        let dir = std::env::temp_dir().join(format!("identity-keys-{}", uuid::Uuid::now_v7()));
        let path = generate(&dir, JwtAlgorithm::EdDsa).unwrap();
        assert!(path.to_string_lossy().ends_with("-eddsa.pem"), "{path:?}");
        let store = KeyStore::load(&dir, JwtAlgorithm::EdDsa, std::time::Duration::ZERO).unwrap();
        assert_eq!(algorithm_name(store.signing().algorithm), "EdDSA");
        fs::remove_dir_all(&dir).unwrap();
    }
}
