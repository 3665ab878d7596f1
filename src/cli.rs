//! What both binaries do around their command: logging to stderr (`DELTAPLANE_LOG` filter),
//! a multi-threaded runtime, and `<name>: <error chain>` with a failure exit code.

use std::process::ExitCode;

/// Runs `command` to completion on a new runtime after installing the tracing subscriber.
pub fn main(
    name: &str,
    default_filter: &str,
    command: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DELTAPLANE_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
