//! Logs: a tracing subscriber writing text or JSON lines to standard error,
//! filtered by `RUST_LOG` (default `info`).
//!
//! Nothing logged anywhere carries a password, a hash or a token: handlers
//! are instrumented with `skip_all`/`skip`, and [`crate::domain::Password`]'s
//! `Debug` hides its value.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. Later calls do nothing, so that tests may
/// call it once per test.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
}
