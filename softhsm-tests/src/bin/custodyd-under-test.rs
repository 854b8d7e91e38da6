//! custodyd's entry point (`custody_daemon::run`), linked in the test build so
//! that process tests (SIGKILL, SIGHUP, SIGTERM) can start it: the release
//! `custodyd` binary refuses builds with HSM fault injection, which every
//! workspace test build has. `--check CONFIG` runs `custodyd --check`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let _log = custody_daemon::run::init_logging();
    let Some(config) = std::env::args_os().nth(1) else {
        eprintln!("usage: custodyd-under-test [--check] CONFIG");
        return ExitCode::FAILURE;
    };
    if config == "--check" {
        let Some(config) = std::env::args_os().nth(2) else {
            eprintln!("usage: custodyd-under-test --check CONFIG");
            return ExitCode::FAILURE;
        };
        return custody_daemon::run::check_command(std::path::Path::new(&config));
    }
    match custody_daemon::run::run(std::path::Path::new(&config)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("custodyd-under-test: {error}");
            ExitCode::FAILURE
        }
    }
}
