//! Room on the disk under the data directory, and the one rule that keeps
//! custodyd from running it out: below a reserve of free space, only reads
//! are served.
//!
//! Why a reserve and not just the write errors: sled latches the first I/O
//! error it meets (every later write of the database fails until it is
//! opened again), because it cannot tell how much of its log reached the
//! disk. So a write that fails for want of space costs a restart. Refusing
//! state changes and signatures while the reserve is short keeps that from
//! happening in the usual case, a disk that fills slowly, and service
//! resumes by itself once space returns. What the reserve still pays for
//! while it is short: the audit record of each read and of each refusal.
//! Should the disk fill completely anyway, the audit log fails closed
//! ([`crate::audit::AuditLog::healthy`]) and custodyd needs a restart once
//! there is room again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{Error, Reason, metrics};

/// The free space under the data directory, sampled by [`Headroom::sample`].
#[derive(Debug)]
pub struct Headroom {
    dir: PathBuf,
    reserve_bytes: u64,
    free_bytes: AtomicU64,
    short: AtomicBool,
}

impl Headroom {
    /// Watches the filesystem holding `dir`, keeping `reserve_bytes` free
    /// (0 turns the rule off). Samples once before returning.
    pub fn new(dir: PathBuf, reserve_bytes: u64) -> Headroom {
        let headroom = Headroom {
            dir,
            reserve_bytes,
            free_bytes: AtomicU64::new(u64::MAX),
            short: AtomicBool::new(false),
        };
        headroom.sample();
        headroom
    }

    /// Reads the free space again and updates the metric. A filesystem that
    /// cannot be read counts as having no room: the rule fails closed.
    pub fn sample(&self) {
        let free = match rustix::fs::statvfs(&self.dir) {
            Ok(stat) => stat.f_bavail.saturating_mul(stat.f_frsize),
            Err(error) => {
                tracing::error!(%error, dir = %self.dir.display(), "cannot read the free space of the data directory");
                0
            }
        };
        let short = self.reserve_bytes > 0 && free < self.reserve_bytes;
        if short != self.short.swap(short, Ordering::SeqCst) {
            if short {
                tracing::error!(
                    free_bytes = free,
                    reserve_bytes = self.reserve_bytes,
                    "the data directory is below its free-space reserve: serving reads only"
                );
            } else {
                tracing::warn!(
                    free_bytes = free,
                    "the data directory has room again: serving everything"
                );
            }
        }
        self.free_bytes.store(free, Ordering::SeqCst);
        metrics::storage(free, short);
    }

    /// Whether the free space was below the reserve at the last sample.
    pub fn is_short(&self) -> bool {
        self.short.load(Ordering::SeqCst)
    }

    /// Refuses while the reserve is short. Asked before every action that
    /// is not only a read (`Action::only_reads`, which the callers ask).
    pub fn ensure_room(&self) -> Result<(), Error> {
        if !self.is_short() {
            return Ok(());
        }
        let mib = |bytes: u64| bytes / (1024 * 1024);
        Err(Error::new(
            Reason::StorageLow,
            format!(
                "the data directory has {} MiB free, below its reserve of {} MiB: only reads are served until space returns",
                mib(self.free_bytes.load(Ordering::SeqCst)),
                mib(self.reserve_bytes)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_leaves_no_room() {
        let dir = tempfile::tempdir().unwrap();
        let headroom = Headroom::new(dir.path().into(), u64::MAX);
        assert!(headroom.is_short());
        let refused = headroom.ensure_room().unwrap_err();
        assert_eq!(refused.reason, Reason::StorageLow);
        assert!(refused.message.contains("MiB free"), "{}", refused.message);
    }

    #[test]
    fn no_reserve_always_has_room_and_a_missing_directory_has_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Headroom::new(dir.path().into(), 0).ensure_room().is_ok());
        let gone = Headroom::new(dir.path().join("gone"), 1);
        assert!(gone.is_short());
        assert!(gone.ensure_room().is_err());
    }
}
