//! The hash formats: what the hashing threads compute (a fresh argon2id
//! PHC string) and verify (any argon2 variant, version and parameters a PHC
//! string names, and bcrypt hashes imported from other systems), and the
//! check that bounds what an import may bring in. No threads, no queue:
//! the pool in `mod.rs` runs these on its own threads with its own memory.

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{Output, ParamsString, PasswordHash, SaltString, rand_core::OsRng},
};

use crate::error::Error;

use super::Memory;

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
pub(super) fn hash_phc(
    argon2: &Argon2<'_>,
    memory: &mut Memory,
    password: &[u8],
) -> Result<String, Error> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::CHEAP;
    use super::*;

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
}
