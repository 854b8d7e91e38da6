//! Bounded work: the caps that keep one caller, or one kind of request, from
//! growing custodyd's state or its queues without bound (threat model R2).
//! The numbers come from the config; each is enforced where the work is
//! taken on:
//!
//! | cap | enforced in | refusal |
//! |---|---|---|
//! | pending operations per requester | `operations::request` | `TOO_MANY_PENDING` |
//! | open ceremonies per officer | `ceremonies::open` | `TOO_MANY_CEREMONIES` |
//! | HSM jobs waiting for a worker | `hsm_shim::Hsm::try_run` | `HSM_BUSY` |
//! | one drift check, one audit verification at a time | [`OneAtATime`] | `ALREADY_RUNNING` |
//!
//! Finished operations are kept for `operation_retention_ms` and then
//! pruned (`operations::vote::expire_due`); each refusal carries a retry
//! hint.

use std::time::Duration;

use crate::config::Config;
use crate::{Error, Reason};

/// The caps custodyd runs with.
#[derive(Debug)]
pub struct Limits {
    /// Most operations one principal may have pending at once.
    pub max_pending_per_requester: usize,
    /// How long a finished operation stays in the store, in milliseconds.
    pub operation_retention_ms: i64,
    /// Most ceremonies one officer may have open at once.
    pub max_open_ceremonies_per_officer: usize,
    /// At most one drift check runs (a request or the scheduler's).
    pub drift: OneAtATime,
    /// At most one verification of the whole audit chain runs.
    pub audit_verify: OneAtATime,
}

impl Limits {
    /// The caps of `config`.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            max_pending_per_requester: config.dual_control.max_pending_per_requester,
            operation_retention_ms: i64::try_from(config.dual_control.operation_retention_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            max_open_ceremonies_per_officer: config.ceremony.max_open_per_officer,
            drift: OneAtATime::new("drift check", Duration::from_secs(5)),
            audit_verify: OneAtATime::new("verification of the audit log", Duration::from_secs(5)),
        }
    }
}

/// Work of which one runs at a time; a second caller is refused
/// `ALREADY_RUNNING` at once rather than queued behind the first (each run
/// reads the whole token or the whole log).
#[derive(Debug)]
pub struct OneAtATime {
    what: &'static str,
    retry: Duration,
    running: tokio::sync::Mutex<()>,
}

impl OneAtATime {
    /// `what` names the work in refusals; `retry` is the hint they carry.
    pub fn new(what: &'static str, retry: Duration) -> OneAtATime {
        OneAtATime {
            what,
            retry,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// The right to run, held until the guard is dropped; refused while
    /// another holds it.
    pub fn try_start(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Error> {
        self.running.try_lock().map_err(|_| {
            Error::new(
                Reason::AlreadyRunning,
                format!("a {} is running; one runs at a time", self.what),
            )
            .retry_after(self.retry)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_is_refused_until_the_first_ends() {
        let gate = OneAtATime::new("drift check", Duration::from_secs(5));
        let first = gate.try_start().expect("nothing runs yet");
        let refused = gate.try_start().expect_err("one runs");
        assert_eq!(refused.reason, Reason::AlreadyRunning);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(5)));
        drop(first);
        assert!(gate.try_start().is_ok());
    }
}
