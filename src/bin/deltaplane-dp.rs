//! `deltaplane-dp`: the data plane binary. Thin: parses settings and runs the library.

use clap::Parser as _;
use deltaplane::dp::config::{Cli, Command};
use deltaplane::dp::{self, DpConfig};

/// The proxy allocates per request; mimalloc costs less than glibc's malloc there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    deltaplane::cli::main("deltaplane-dp", "info", run(cli))
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
            deltaplane::node::shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await;
            Ok(())
        }
        Command::Status(args) => dp::status::print(&args).await,
    }
}
