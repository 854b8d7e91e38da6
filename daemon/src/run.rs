//! The daemon's process life: load the config, open everything, listen, and
//! react to signals (SIGHUP reloads TLS files; SIGTERM or SIGINT stop after
//! in-flight requests), telling systemd each step ([`crate::notify`]).
//! `custodyd` is this plus logging setup.

use std::path::Path;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::server::Daemon;
use custody_core::config::Config;

/// Runs custodyd with the config at `config_path` until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let listen = config.listen;
    crate::notify::status("starting: opening the store, the HSM and the audit log");
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
            crate::notify::reloading();
            match tls.reload() {
                Ok(()) => crate::notify::ready(&format!("serving on {local}; TLS files reloaded")),
                Err(error) => {
                    tracing::error!(%error, "TLS reload failed; keeping the current certificates");
                    crate::notify::ready(&format!(
                        "serving on {local}; TLS reload failed, the current certificates kept: {error}"
                    ));
                }
            }
        }
    });
    if let Some(interval) = crate::notify::watchdog_interval() {
        tokio::spawn(crate::notify::watchdog(interval));
    }
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let shutdown = async move {
        let signal = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        };
        tracing::info!(signal, "shutting down after in-flight requests");
        crate::notify::stopping(signal);
        signal
    };
    crate::notify::ready(&format!("serving on {local}"));
    daemon.serve(listener, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Clears the failed-login count in the database of the config at
/// `config_path`; returns how many failures it cleared.
pub fn reset_pin_lockout(config_path: &Path) -> Result<u32, String> {
    let config = Config::load_offline(config_path).map_err(|e| e.to_string())?;
    let db = crate::server::open_db(&config.data_dir, config.storage.cache_bytes())?;
    let count = custody_core::pin_lockout::failures(&db)?;
    custody_core::pin_lockout::reset(&db)?;
    Ok(count)
}

/// The integrity check of the data directory of the config at
/// `config_path`, offline (threat model F2): no HSM, no PIN, and nothing in
/// the directory opened for writing. sled has no read-only mode (opening a
/// database may tidy its files), so the check runs on a copy made in a
/// temporary directory (`TMPDIR`), removed afterwards. Returns whether the
/// directory is clean, and the report. Meant for a stopped custodyd: a copy
/// taken while it writes may show a torn tail.
pub fn check(config_path: &Path) -> Result<(bool, String), String> {
    let config = Config::load_offline(config_path).map_err(|e| e.to_string())?;
    let source = config.data_dir.join("custody.sled");
    if !source.is_dir() {
        return Err(format!(
            "data directory {}: no database ({} does not exist)",
            config.data_dir.display(),
            source.display()
        ));
    }
    let scratch = tempfile::Builder::new()
        .prefix("custodyd-check-")
        .tempdir()
        .map_err(|e| format!("a temporary directory for the copy: {e}"))?;
    let copy = scratch.path().join("custody.sled");
    copy_tree(&source, &copy)?;
    let db = custody_store::Store::open_sled(&copy, config.storage.cache_bytes())
        .map_err(|e| format!("database in {}: {e}", config.data_dir.display()))?;
    // The segment log is read in place: reading changes nothing in it.
    let records = custody_core::audit::RecordHome::of_data_dir(&db, &config.data_dir)?;
    let report = custody_core::integrity::check(&db, &records);
    Ok((report.is_clean(), report.describe(&config.data_dir)))
}

/// `custodyd --check CONFIG`: prints the report of [`check`] and returns
/// the exit code: 0 if the directory is clean, 1 if not, 2 if it could not
/// be checked.
pub fn check_command(config_path: &Path) -> std::process::ExitCode {
    match check(config_path) {
        Ok((clean, report)) => {
            #[expect(clippy::print_stdout, reason = "the report is the command's output")]
            {
                println!("{report}");
            }
            std::process::ExitCode::from(if clean { 0 } else { 1 })
        }
        Err(error) => {
            eprintln!("custodyd --check: {error}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Copies the directory `from` (files and directories only) to `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Keeps custodyd's log writer thread; dropping it (at the end of `main`)
/// writes the lines still queued (waiting about a second at most).
#[must_use = "dropping the guard stops the log's writer thread"]
pub struct LogGuard {
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): as text, or
/// with `CUSTODY_LOG_FORMAT=json` one JSON object per line, whose
/// `request_id` field is the one in the request's audit record. Colours
/// only when stderr is a terminal (under systemd it is journald) and
/// `NO_COLOR` is unset or empty.
pub fn init_logging() -> LogGuard {
    let stderr = std::io::stderr();
    let colour = std::io::IsTerminal::is_terminal(&stderr)
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    init_logging_to(stderr, colour)
}

/// [`init_logging`], the lines going to `writer` (a benchmark's file).
///
/// A line is formatted on the thread that logs it and written by a thread
/// of its own, which writes whatever has queued in one `write` (written
/// line by line on the request's thread, the request lines cost about a
/// tenth of the signatures a second; this takes back about half of that,
/// docs/benchmarks.md). No line is dropped while custodyd runs: when the
/// queue is full, the thread that logs waits. At exit the writer gets up to
/// a second to write what is queued; lines still queued when the process
/// is killed are lost. The audit log, not this log, is the record.
pub fn init_logging_to(writer: impl std::io::Write + Send + 'static, colour: bool) -> LogGuard {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let format = std::env::var("CUSTODY_LOG_FORMAT").unwrap_or_default();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(writer));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.with_target(false).init();
        if !format.is_empty() && format != "text" {
            tracing::warn!(
                "CUSTODY_LOG_FORMAT={} is neither text nor json: logging text",
                custody_core::text::escape(&format)
            );
        }
    }
    LogGuard { _writer: guard }
}
