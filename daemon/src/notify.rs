//! systemd's service notifications (`sd_notify(3)`): `READY=1` once custodyd
//! listens, `RELOADING=1` then `READY=1` around a SIGHUP reload, `STOPPING=1`
//! when a stop begins, `STATUS=` lines saying what custodyd is doing or why
//! it cannot serve, `EXTEND_TIMEOUT_USEC=` while a long step of the start
//! (the audit log's move) goes on, and `WATCHDOG=1` at half the unit's `WatchdogSec=` while
//! the runtime turns. Outside systemd (`$NOTIFY_SOCKET` unset) nothing is
//! sent. A notification that cannot be sent is logged and otherwise ignored:
//! systemd then acts on its own timeouts.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "systemd notification not sent");
    }
}

/// custodyd listens and serves: `READY=1` with `status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload (SIGHUP) starts: `RELOADING=1` with the monotonic time systemd
/// asks of `Type=notify-reload` services.
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading TLS files"),
    ];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// A stop begins (`signal` caused it): `STOPPING=1`.
pub fn stopping(signal: &str) {
    let status = format!("stopping ({signal}): finishing requests in flight");
    send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
}

/// A long step of the start is still going (`status` says which):
/// `EXTEND_TIMEOUT_USEC=` asks systemd for `by` more before its start
/// timeout, so a start that keeps reporting progress is not killed, and one
/// that stops reporting still is.
pub fn still_starting(by: Duration, status: &str) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status(status),
    ]);
}

/// What custodyd is doing, or why it cannot serve.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The interval systemd expects `WATCHDOG=1` within (`WatchdogSec=`, given
/// as `$WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|interval| !interval.is_zero())
}

/// Sends `WATCHDOG=1` at half of `interval`, for as long as the runtime
/// runs this task: a runtime that stops turning misses it, and systemd
/// restarts custodyd.
pub async fn watchdog(interval: Duration) {
    let mut ticks = tokio::time::interval(interval / 2);
    loop {
        ticks.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}
