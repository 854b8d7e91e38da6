//! custodyd: the signing and key-custody daemon.
//!
//! `custodyd --config /etc/custody/custodyd.toml`. SIGHUP reloads the TLS
//! certificate, key, client CA and CRLs; SIGTERM or SIGINT stop it after the
//! requests in flight finish. `custodyd --check /etc/custody/custodyd.toml`
//! checks the data directory offline and exits (0 if clean).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "custodyd",
    version,
    about = "custody signing and key-custody daemon"
)]
struct Args {
    /// Path of the TOML configuration (see deploy/custodyd.toml).
    #[arg(long, short, required_unless_present = "check")]
    config: Option<PathBuf>,
    /// Clear the count of failed HSM logins (after finding out why they
    /// failed), then exit.
    #[arg(long)]
    reset_pin_lockout: bool,
    /// Check the data directory of the configuration CONFIG offline (no HSM
    /// login, nothing changed), print the report, and exit: 0 if clean.
    #[arg(long, value_name = "CONFIG", conflicts_with_all = ["config", "reset_pin_lockout"])]
    check: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _log = custody_daemon::run::init_logging();
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
    if let Some(config) = &args.check {
        return custody_daemon::run::check_command(config);
    }
    // Present unless --check was given (clap requires it).
    let Some(config) = args.config else {
        return ExitCode::FAILURE;
    };
    if args.reset_pin_lockout {
        return match custody_daemon::run::reset_pin_lockout(&config) {
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
    match custody_daemon::run::run(&config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("custodyd: {error}");
            ExitCode::FAILURE
        }
    }
}
