//! Crash points for tests: `failpoint::hit("name")` kills custodyd with
//! SIGKILL when it was started with `CUSTODY_CRASH_AT=name`, or stops it
//! with SIGSTOP (it goes on when continued: a process stalled past its
//! lease) when started with `CUSTODY_STOP_AT=name`.
//!
//! Compiled in only with the `failpoints` feature, which only the test
//! build enables (`custodyd` refuses to run a release build that has it);
//! otherwise `hit` is an empty inline function. A real SIGKILL, not a panic
//! or an abort handler, so that the test sees exactly what `kill -9` leaves:
//! no destructor, no flush, no goodbye.

/// Every crash point, in the order a rotation passes them (tests iterate
/// over this list, so a point added in code but not here is a test gap).
pub const ROTATION_POINTS: [&str; 4] = [
    "version.before_journal",
    "version.after_journal",
    "version.after_generate",
    "version.after_commit",
];

/// Dies here if this is the crash point the process was started with, or
/// stops here until continued if it is its stop point.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) {
    static CRASH_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static STOP_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let crash_at = CRASH_AT.get_or_init(|| std::env::var("CUSTODY_CRASH_AT").ok());
    let stop_at = STOP_AT.get_or_init(|| std::env::var("CUSTODY_STOP_AT").ok());
    if stop_at.as_deref() == Some(name) {
        eprintln!("custodyd: stop point {name} reached: SIGSTOP");
        outside_token_file_locks();
        // The whole process stops while this thread waits for the signal
        // to land; once continued it goes on from here.
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &std::process::id().to_string()])
            .status();
    }
    if crash_at.as_deref() == Some(name) {
        // Straight to stderr, not through the log thread, whose queue the
        // kill would take with it: a crash test's output says where it died.
        eprintln!("custodyd: crash point {name} reached: SIGKILL");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        // The signal is on its way; do nothing more meanwhile.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Waits (at most five seconds) for a moment when no thread of this
/// process holds a POSIX file lock. SoftHSM2 holds one on the token's files
/// during a call; a process stopped inside such a call would stall every
/// other process on the token until it is continued, which is SoftHSM2's
/// doing, not a stalled replica's (an HSM shared over the network holds no
/// lock for a client), and would make a stop test wait on itself.
#[cfg(feature = "failpoints")]
fn outside_token_file_locks() {
    let pid = std::process::id().to_string();
    let holds_one = || {
        std::fs::read_to_string("/proc/locks").is_ok_and(|locks| {
            locks.lines().any(|line| {
                let mut fields = line.split_whitespace().skip(1);
                fields.next() == Some("POSIX") && fields.nth(2) == Some(pid.as_str())
            })
        })
    };
    for _ in 0..5_000 {
        if !holds_one() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Does nothing: this build has no crash points.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str) {}

/// Whether crash points are compiled in (custodyd refuses optimised builds
/// that have them).
pub const COMPILED_IN: bool = cfg!(feature = "failpoints");
