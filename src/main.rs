//! The `identity` binary: parse the command line, set up logs, build the
//! runtime with `WEB_CONCURRENCY` workers, run the subcommand.

use std::process::ExitCode;

use identity::{cli::Cli, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    // Before the runtime, so that panics on any of its threads are reported;
    // the guard flushes queued events when main returns.
    let _sentry = telemetry::init_sentry(cli.sentry_dsn());
    telemetry::init(cli.log_format());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("identity: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cli.run())
}
