//! The `identity` binary: parse the command line, set up logs, build the
//! runtime with `WEB_CONCURRENCY` workers, run the subcommand.

use std::process::ExitCode;

use identity::{cli::Cli, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    // Before the runtime, so that panics on any of its threads are reported;
    // the guard flushes queued events when main returns.
    let _sentry = telemetry::init_sentry(cli.sentry_dsn());
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
    runtime.block_on(async {
        // In the runtime: the span exporter's channel lives on it.
        let traces = match cli.otlp_endpoint().map(telemetry::Traces::start) {
            None => None,
            Some(Ok(traces)) => Some(traces),
            Some(Err(e)) => {
                eprintln!("identity: {e}");
                return ExitCode::from(2);
            }
        };
        telemetry::init_with(cli.log_format(), traces.as_ref());
        let code = cli.run().await;
        if let Some(traces) = traces {
            traces.shutdown().await;
        }
        // The last lines are written before exit.
        telemetry::finish_logs();
        code
    })
}
