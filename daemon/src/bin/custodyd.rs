//! custodyd: the signing and key-custody daemon.
//!
//! `custodyd --config /etc/custody/custodyd.toml`. SIGHUP reloads the TLS
//! certificate, key, client CA and CRLs; SIGTERM or SIGINT stop it after the
//! requests in flight finish.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use custody_daemon::config::Config;
use custody_daemon::server::Daemon;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(version, about = "custody signing and key-custody daemon")]
struct Args {
    /// Path of the TOML configuration (see deploy/custodyd.toml).
    #[arg(long, short)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("custodyd: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    // Only test builds of the workspace enable it (a dev-dependency feature);
    // a daemon that can be told to fake HSM errors must never serve.
    if hsm_shim::FAULT_INJECTION_COMPILED_IN {
        return Err("this build has HSM fault injection compiled in; refusing to run. Build custodyd on its own: cargo build --release -p custody-daemon".into());
    }
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    let listen = config.listen;
    let daemon = Daemon::open(config).await?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%local, "listening (mTLS)");

    let tls = daemon.tls.clone();
    let mut hangups = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Err(error) = tls.reload() {
                tracing::error!(%error, "TLS reload failed; keeping the current certificates");
            }
        }
    });
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down after in-flight requests");
    };
    daemon.serve(listener, shutdown).await
}
