//! custodyd: the signing and key-custody daemon.
//!
//! `custodyd --config /etc/custody/custodyd.toml`. SIGHUP reloads the TLS
//! certificate, key, client CA and CRLs; SIGTERM or SIGINT stop it after the
//! requests in flight finish.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "custody signing and key-custody daemon")]
struct Args {
    /// Path of the TOML configuration (see deploy/custodyd.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Clear the count of failed HSM logins (after finding out why they
    /// failed), then exit.
    #[arg(long)]
    reset_pin_lockout: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    custody_daemon::run::init_logging();
    let args = Args::parse();
    // Test builds of the workspace enable HSM fault injection and crash
    // points (dev-dependency features). An optimised daemon that can be told to fake
    // HSM errors must never serve; debug builds may, for process tests.
    let test_build = hsm_shim::FAULT_INJECTION_COMPILED_IN || custody_core::failpoint::COMPILED_IN;
    if test_build && !cfg!(debug_assertions) {
        tracing::error!(
            "custodyd: this build has HSM fault injection or crash points compiled in; build it on its own: cargo build --release -p custody-daemon"
        );
        return ExitCode::FAILURE;
    }
    if args.reset_pin_lockout {
        return match custody_daemon::run::reset_pin_lockout(&args.config) {
            Ok(count) => {
                tracing::info!("cleared {count} failed HSM logins");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!("custodyd: {error}");
                ExitCode::FAILURE
            }
        };
    }
    match custody_daemon::run::run(&args.config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("custodyd: {error}");
            ExitCode::FAILURE
        }
    }
}
