//! The breached-password list of BREACHED_PASSWORDS_FILE, loaded once at
//! start by `serve` and by `createsuperuser` (the commands that set
//! passwords), on a blocking thread: reading 10 million text entries takes
//! seconds, the built file a fraction of one (BENCHMARKS.md).

use std::time::Instant;

use crate::config::Config;
use crate::domain::BreachedList;

use super::StartupError;

/// The list BREACHED_PASSWORDS_FILE names, or the empty one when it is
/// unset. A file that cannot be loaded is a bad setting: one line naming
/// the variable, the file and (for a malformed line) its number.
pub async fn load_breached(config: &Config) -> Result<BreachedList, StartupError> {
    let Some(path) = config.breached_passwords_file.clone() else {
        return Ok(BreachedList::empty());
    };
    let start = Instant::now();
    let shown = path.display().to_string();
    let (list, format) = tokio::task::spawn_blocking(move || BreachedList::load(&path))
        .await
        .map_err(|e| StartupError::Other(e.to_string()))?
        .map_err(|e| StartupError::Setting("BREACHED_PASSWORDS_FILE", e.to_string()))?;
    if list.is_empty() {
        tracing::warn!(file = %shown, "BREACHED_PASSWORDS_FILE holds no entry");
    }
    tracing::info!(
        file = %shown,
        format = %format,
        entries = list.len(),
        seconds = start.elapsed().as_secs_f64(),
        false_positive_rate = list.false_positive_rate(),
        "breached-password list loaded"
    );
    Ok(list)
}
