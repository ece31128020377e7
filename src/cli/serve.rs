//! `identity serve`: the service until a stop signal. The signal handlers
//! are installed before start-up, so that a SIGTERM at any moment stops it
//! cleanly.

use crate::app::{Application, StartupError};
use crate::config::Config;

pub(super) async fn serve(config: Config) -> Result<(), StartupError> {
    // From the first moment, SIGHUP means "reload keys", never the default
    // "terminate": a rotation hook may fire while the service starts.
    let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| StartupError::Other(format!("cannot handle SIGHUP: {e}")))?;
    let stop = shutdown_signal();
    let app = Application::build(&config).await?;
    app.run_until_stopped(stop).await
}

/// Resolves on Ctrl-C or SIGTERM (what a mesh or orchestrator sends). The
/// handlers are installed when this is called, not when the future is first
/// polled (once serving starts): a SIGTERM that arrives while the service
/// starts, or just after its ready line, then stops it cleanly instead of
/// killing it with the default action and orphaning its embedded cluster.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn received(signal: std::io::Result<Signal>, name: &str) {
        match signal {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for {name}");
                std::future::pending::<()>().await;
            }
        }
    }
    let interrupt = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        tokio::select! {
            _ = received(interrupt, "SIGINT") => tracing::info!("interrupt received: shutting down"),
            _ = received(term, "SIGTERM") => tracing::info!("SIGTERM received: shutting down"),
        }
    }
}
