//! `deltaplane-dp`: the data plane binary. Thin: parses settings and runs the library.

use clap::Parser as _;
use deltaplane::dp::config::{Cli, Command};
use deltaplane::dp::{self, DpConfig};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DELTAPLANE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deltaplane-dp: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let cfg = DpConfig::from_args(&args)?;
            let running = dp::start(cfg).await?;
            println!(
                "deltaplane-dp: status on http://{} (version {})",
                running.status_addr,
                running.shared.store.state().version
            );
            deltaplane::cp::shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await;
            Ok(())
        }
        Command::Status(args) => dp::status::print(&args).await,
    }
}
