//! The daemon's process life: load the config, open everything, listen, and
//! react to signals (SIGHUP reloads TLS files; SIGTERM or SIGINT stop after
//! in-flight requests). `custodyd` is this plus logging setup.

use std::path::Path;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::server::Daemon;
use custody_core::config::Config;

/// Runs custodyd with the config at `config_path` until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
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
        let signal = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        };
        tracing::info!(signal, "shutting down after in-flight requests");
        signal
    };
    daemon.serve(listener, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Clears the failed-login count in the database of the config at
/// `config_path`; returns how many failures it cleared.
pub fn reset_pin_lockout(config_path: &Path) -> Result<u32, String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let db = crate::server::open_db(&config.data_dir)?;
    let count = custody_core::pin_lockout::failures(&db)?;
    custody_core::pin_lockout::reset(&db)?;
    Ok(count)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}
