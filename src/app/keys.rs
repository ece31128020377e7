//! The key reloader: `KEYS_DIR` read again on SIGHUP and on a timer, so
//! that a rotation takes effect in a running service. A task of its own,
//! started by [`super::Application::run_until_stopped`] and ended with it.

use crate::token::{KeyStore, TokenIssuer};

use super::KeysSource;

/// Re-reads `KEYS_DIR` on SIGHUP and every `KEYS_RELOAD_INTERVAL`, so that
/// `identity keys rotate` (or a key mounted from a secret store) takes effect
/// without a restart: the newest key signs, every key still in the folder
/// verifies, and a key removed from it stops verifying. A reload that
/// fails is counted in `failures` (`identity_keys_reload_failures_total`)
/// and logged; the keys in use stay.
pub(super) async fn reload_keys(
    source: KeysSource,
    pool: crate::db::Pool,
    tokens: TokenIssuer,
    failures: prometheus::IntCounter,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; keys reload on a timer only");
            None
        }
    };
    let mut tick = tokio::time::interval(source.interval);
    tick.tick().await;
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = hup => tracing::info!("SIGHUP received: reloading keys"),
            _ = stopped.changed() => return,
        }
        let (dir, alg, delay) = (
            source.dir.clone(),
            source.algorithm,
            source.activation_delay,
        );
        match tokio::task::spawn_blocking(move || KeyStore::load(&dir, alg, delay)).await {
            Ok(Ok(keys)) => {
                let signing = keys.signing().kid.clone();
                let count = keys.keys().len();
                if tokens.replace_keys(keys) {
                    tracing::info!(signing_kid = %signing, keys = count, "keys reloaded");
                    record_keys_changed(&pool).await;
                }
            }
            Ok(Err(e)) => {
                failures.inc();
                tracing::error!(error = %e, "keys not reloaded; the current ones stay");
            }
            Err(e) => {
                failures.inc();
                tracing::error!(error = %e, "keys not reloaded");
            }
        }
    }
}

/// Records KEYS_CHANGED in the change feed, so that verifiers re-read the
/// public keys; a failure is logged (the keys are in use all the same).
async fn record_keys_changed(pool: &crate::db::Pool) {
    let result = async {
        let mut conn = crate::db::conn(pool).await?;
        crate::db::changes::record_keys_changed(&mut conn).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "the key change was not recorded in the change feed");
    }
}
