//! `deltaplane-cp`: the control plane binary. Thin: parses settings and runs the library.

use clap::Parser as _;
use deltaplane::cp::config::{CertsCommand, Cli, Command};
use deltaplane::cp::{self, CpConfig};

fn main() -> std::process::ExitCode {
    deltaplane::node::limit_malloc_arenas();
    let cli = Cli::parse();
    deltaplane::cli::main("deltaplane-cp", "info,sqlx=warn", run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let cfg = CpConfig::from_args(&args)?;
            if let Some(n) = deltaplane::node::raise_open_files_limit() {
                // A few dozen descriptors go to the database, listeners and logs.
                tracing::info!(
                    open_files = n,
                    data_planes = n.saturating_sub(64),
                    "open-files limit: about this many data planes can connect"
                );
            }
            let running = cp::start(cfg).await?;
            println!("deltaplane-cp: Admin API on http://{}", running.admin_addr);
            deltaplane::node::shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await;
            Ok(())
        }
        Command::Migrate(args) => {
            let cfg = CpConfig::from_args(&args)?;
            std::fs::create_dir_all(&cfg.data_dir)?;
            let store = deltaplane::cp::store::Store::open(cp::store_options(&cfg))
                .await
                .map_err(|e| anyhow::anyhow!("migrating: {e}"))?;
            let info = store
                .version_info()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "deltaplane-cp: database migrated (change-log version {}, epoch {})",
                info.version, info.epoch
            );
            store.close().await;
            Ok(())
        }
        Command::Certs(CertsCommand::Generate { out }) => {
            std::fs::create_dir_all(&out)?;
            let (crt, key) = deltaplane::net::tls::generate_shared_cert(&out)?;
            println!(
                "deltaplane-cp: wrote {} and {}",
                crt.display(),
                key.display()
            );
            Ok(())
        }
        Command::Status(args) => cp::status::print(&args).await,
        Command::Config(command) => cp::config_cmd::run(command).await,
    }
}
