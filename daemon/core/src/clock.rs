//! The time every rule reads: approval expiry, cryptoperiods, cancel
//! windows. Tests inject their own clock to move through them.
//!
//! custodyd never decides by the wall clock directly: [`GuardedClock`]
//! (threat model F7) hands out a time that never goes backwards, kept in
//! the data directory so a restart cannot reset it. When the wall clock
//! steps back, that time runs on at the rate the monotonic clock sees time
//! pass, so an expired approval or a finished cryptoperiod is never
//! reopened and every window keeps its real length. Each wall reading is
//! compared with the monotonic clock; a step larger than the tolerance is
//! reported ([`ClockStep`]): counted in a metric, audited by the scheduler,
//! and, when forward, every scheduled destruction is held back by the step
//! so its cancel window still lasts its full length in real time.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Where custody reads the time from.
pub trait Clock: Send + Sync {
    /// Unix milliseconds now.
    fn now_ms(&self) -> i64;

    /// Milliseconds on a clock that only moves forward at the rate time
    /// passes, from an arbitrary origin (the process's start): what a wall
    /// reading is checked against.
    fn monotonic_ms(&self) -> i64 {
        monotonic_ms()
    }

    /// The large steps seen since the last call, oldest first (only a
    /// [`GuardedClock`] sees any).
    fn take_steps(&self) -> Vec<ClockStep> {
        Vec::new()
    }

    /// Gives back steps taken but not dealt with (holding destructions back
    /// failed), ahead of any seen since: destructions keep waiting, and the
    /// next turn tries again.
    fn return_steps(&self, _steps: Vec<ClockStep>) {}

    /// Whether a large step has been seen and not yet taken: scheduled
    /// destructions wait until it has been dealt with.
    fn steps_pending(&self) -> bool {
        false
    }
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// Unix milliseconds now, from the system clock.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Milliseconds since this process first asked.
pub fn monotonic_ms() -> i64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let elapsed = ORIGIN.get_or_init(Instant::now).elapsed().as_millis();
    i64::try_from(elapsed).unwrap_or(i64::MAX)
}

/// A wall-clock step larger than the tolerance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockStep {
    /// What the wall clock should have read, by the monotonic clock (at a
    /// start: the highest time custodyd had used before it stopped).
    pub expected_ms: i64,
    /// What it read.
    pub read_ms: i64,
    /// Seen at start, against the stored time: a backward step while
    /// custodyd was down (a forward one cannot be told from downtime).
    pub at_start: bool,
}

impl ClockStep {
    /// How far the wall clock jumped: positive forward, negative backward.
    pub fn offset_ms(&self) -> i64 {
        self.read_ms.saturating_sub(self.expected_ms)
    }

    /// `forward` or `backward`, the metric's label.
    pub fn direction(&self) -> &'static str {
        if self.offset_ms() > 0 {
            "forward"
        } else {
            "backward"
        }
    }
}

/// The key of the stored time; a replica's is this, `/`, its id: replicas
/// sharing a store each guard their own machine's clock.
const HIGH_WATER: &str = "high_water_ms";

fn high_water_key(replica: Option<&str>) -> Vec<u8> {
    match replica {
        Some(replica) => format!("{HIGH_WATER}/{replica}").into_bytes(),
        None => HIGH_WATER.as_bytes().to_vec(),
    }
}
/// How far the stored time may lag the time used: a crash loses at most
/// this much of it (plus sled's 500 ms flush timer).
const PERSIST_EVERY_MS: i64 = 1000;

struct Guard {
    /// The time last handed out.
    decided: i64,
    persisted: i64,
    last_wall: i64,
    last_monotonic: i64,
    steps: Vec<ClockStep>,
}

/// The clock custodyd decides by: never backwards, steps reported.
pub struct GuardedClock {
    source: Arc<dyn Clock>,
    tree: custody_store::Keyspace,
    key: Vec<u8>,
    tolerance_ms: i64,
    guard: Mutex<Guard>,
}

impl std::fmt::Debug for GuardedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedClock")
            .field("tolerance_ms", &self.tolerance_ms)
            .finish_non_exhaustive()
    }
}

/// The start check of tree `clock` (threat model F1): an 8-byte time under
/// each key, the one key of a custodyd alone or one per replica. (A deleted
/// time cannot be told from a first start; it would let time run from the
/// wall clock again.)
pub fn check_stored(db: &custody_store::Store, findings: &mut crate::findings::Findings) {
    crate::findings::each_record(db, "clock", findings, |key, value, findings| {
        let replica = key
            .strip_prefix(HIGH_WATER.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"/"));
        if key != HIGH_WATER.as_bytes() && replica.is_none_or(<[u8]>::is_empty) {
            findings.add(
                "clock",
                key,
                "expected only the key \"high_water_ms\" or \"high_water_ms/\" and a replica id",
            );
        } else if value.len() != 8 {
            findings.add(
                "clock",
                key,
                format!(
                    "expected a time of 8 bytes (big-endian milliseconds), found {} bytes",
                    value.len()
                ),
            );
        }
    });
}

impl GuardedClock {
    /// Guards `source`, with the latest time used before kept in `db`
    /// (tree `clock`, under `replica`'s own key if it is one of several).
    /// A stored time ahead of the wall clock by more than `tolerance_ms` is
    /// a backward step while custodyd was down: reported, and time runs on
    /// from the stored value.
    pub fn open(
        db: &custody_store::Store,
        source: Arc<dyn Clock>,
        tolerance_ms: i64,
        replica: Option<&str>,
    ) -> Result<GuardedClock, String> {
        let tree = db
            .keyspace("clock")
            .map_err(|e| format!("clock tree: {e}"))?;
        let key = high_water_key(replica);
        let stored = match tree.get(&key).map_err(|e| format!("clock tree: {e}"))? {
            None => None,
            Some(bytes) => Some(
                <[u8; 8]>::try_from(bytes.as_slice())
                    .map(i64::from_be_bytes)
                    .map_err(|_| {
                        "clock tree: the stored time is not 8 bytes; the data directory is damaged"
                            .to_string()
                    })?,
            ),
        };
        let wall = source.now_ms();
        let mut steps = Vec::new();
        if let Some(stored) = stored.filter(|stored| stored - wall > tolerance_ms) {
            steps.push(ClockStep {
                expected_ms: stored,
                read_ms: wall,
                at_start: true,
            });
            crate::metrics::clock_step("backward");
        }
        let decided = stored.unwrap_or(wall).max(wall);
        tree.insert(&key, decided.to_be_bytes())
            .and_then(|()| db.flush())
            .map_err(|e| format!("clock tree: {e}"))?;
        Ok(GuardedClock {
            tree,
            key,
            tolerance_ms,
            guard: Mutex::new(Guard {
                decided,
                persisted: decided,
                last_wall: wall,
                last_monotonic: source.monotonic_ms(),
                steps,
            }),
            source,
        })
    }

    /// How far the wall clock is behind the time custodyd decides by
    /// (0 unless it stepped back).
    pub fn behind_ms(&self) -> i64 {
        let wall = self.source.now_ms();
        (self.now_ms() - wall).max(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Guard> {
        // A panic while holding this lock leaves plain integers behind.
        self.guard.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for GuardedClock {
    fn now_ms(&self) -> i64 {
        let wall = self.source.now_ms();
        let monotonic = self.source.monotonic_ms();
        let mut guard = self.lock();
        let elapsed = monotonic.saturating_sub(guard.last_monotonic).max(0);
        // Where the wall clock should be, and where custodyd's time should
        // be, if no step happened since the last reading.
        let expected = guard.last_wall.saturating_add(elapsed);
        let projected = guard.decided.saturating_add(elapsed);
        if wall.saturating_sub(expected).abs() > self.tolerance_ms {
            let step = ClockStep {
                expected_ms: expected,
                read_ms: wall,
                at_start: false,
            };
            crate::metrics::clock_step(step.direction());
            tracing::warn!(
                offset_ms = step.offset_ms(),
                "the wall clock stepped by more than the tolerance"
            );
            guard.steps.push(step);
        }
        // Behind by more than the tolerance, the wall clock is not followed:
        // time runs on at the rate the monotonic clock sees it pass, so every
        // window keeps its length in real time, including the time that
        // passed unread before the step. Otherwise the wall clock is followed,
        // never backwards.
        let decided = if wall < projected.saturating_sub(self.tolerance_ms) {
            projected
        } else {
            wall.max(guard.decided)
        };
        guard.decided = decided;
        guard.last_wall = wall;
        guard.last_monotonic = monotonic;
        if decided - guard.persisted >= PERSIST_EVERY_MS {
            // sled writes it out within its flush interval; a failed write
            // only means a restart may not know the latest time, which the
            // next successful write corrects.
            if self.tree.insert(&self.key, decided.to_be_bytes()).is_ok() {
                guard.persisted = decided;
            }
        }
        crate::metrics::clock_behind(decided - wall);
        decided
    }

    fn take_steps(&self) -> Vec<ClockStep> {
        std::mem::take(&mut self.lock().steps)
    }

    fn return_steps(&self, mut steps: Vec<ClockStep>) {
        let mut guard = self.lock();
        steps.append(&mut guard.steps);
        guard.steps = steps;
    }

    fn steps_pending(&self) -> bool {
        !self.lock().steps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    #[derive(Default)]
    struct Hand {
        wall: AtomicI64,
        monotonic: AtomicI64,
    }

    impl Clock for Hand {
        fn now_ms(&self) -> i64 {
            self.wall.load(Ordering::SeqCst)
        }
        fn monotonic_ms(&self) -> i64 {
            self.monotonic.load(Ordering::SeqCst)
        }
    }

    fn db() -> (tempfile::TempDir, custody_store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        (dir, db)
    }

    #[test]
    fn replicas_on_one_store_each_guard_their_own_clock() {
        let (_dir, db) = db();
        let (ahead, behind) = (Arc::new(Hand::default()), Arc::new(Hand::default()));
        ahead.wall.store(1_000_000, Ordering::SeqCst);
        behind.wall.store(900_000, Ordering::SeqCst);
        let a = GuardedClock::open(&db, ahead.clone(), 5_000, Some("a")).unwrap();
        assert_eq!(a.now_ms(), 1_000_000);
        // Another machine's clock, 100 s behind, is not a step of this one.
        let b = GuardedClock::open(&db, behind.clone(), 5_000, Some("b")).unwrap();
        assert_eq!(b.now_ms(), 900_000);
        assert!(b.take_steps().is_empty());
        // Each replica's own time still never goes back across restarts.
        drop(b);
        behind.wall.store(800_000, Ordering::SeqCst);
        let b = GuardedClock::open(&db, behind.clone(), 5_000, Some("b")).unwrap();
        assert_eq!(b.now_ms(), 900_000);
        assert_eq!(b.take_steps().len(), 1);
        let mut findings = crate::findings::Findings::default();
        check_stored(&db, &mut findings);
        assert!(findings.is_empty(), "{findings:?}");
    }

    #[test]
    fn time_never_goes_back_and_steps_beyond_the_tolerance_are_reported() {
        let (_dir, db) = db();
        let hand = Arc::new(Hand::default());
        hand.wall.store(1_000_000, Ordering::SeqCst);
        let clock = GuardedClock::open(&db, hand.clone(), 5_000, None).unwrap();
        assert_eq!(clock.now_ms(), 1_000_000);
        // Time passing on both clocks is no step.
        hand.wall.fetch_add(60_000, Ordering::SeqCst);
        hand.monotonic.fetch_add(60_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 1_060_000);
        assert!(!clock.steps_pending());
        // A small slew is within the tolerance.
        hand.wall.fetch_add(-4_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 1_060_000);
        assert!(!clock.steps_pending());
        // Back an hour: time stays where it was, then runs on as time
        // passes, ahead of the wall clock.
        hand.wall.fetch_add(-3_600_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 1_060_000);
        let steps = clock.take_steps();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].offset_ms(), -3_600_000);
        assert_eq!(clock.behind_ms(), 3_604_000);
        hand.wall.fetch_add(10_000, Ordering::SeqCst);
        hand.monotonic.fetch_add(10_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 1_070_000);
        assert!(!clock.steps_pending());
        // Forward a day: followed, and reported.
        hand.wall.fetch_add(86_400_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 1_000_000 + 86_400_000 - 3_534_000);
        assert_eq!(clock.take_steps()[0].direction(), "forward");
    }

    #[test]
    fn steps_given_back_come_first_and_keep_destructions_waiting() {
        let (_dir, db) = db();
        let hand = Arc::new(Hand::default());
        hand.wall.store(1_000_000, Ordering::SeqCst);
        let clock = GuardedClock::open(&db, hand.clone(), 5_000, None).unwrap();
        hand.wall.fetch_add(600_000, Ordering::SeqCst);
        clock.now_ms();
        let taken = clock.take_steps();
        assert!(!clock.steps_pending());
        // Another step while the first is being dealt with, then the
        // first's hold fails and it is given back.
        hand.wall.fetch_add(900_000, Ordering::SeqCst);
        clock.now_ms();
        clock.return_steps(taken);
        assert!(clock.steps_pending());
        let again = clock.take_steps();
        assert_eq!(
            again.iter().map(ClockStep::offset_ms).collect::<Vec<_>>(),
            [600_000, 900_000]
        );
    }

    #[test]
    fn time_that_passed_unread_before_a_step_back_still_counts() {
        let (_dir, db) = db();
        let hand = Arc::new(Hand::default());
        hand.wall.store(1_000_000, Ordering::SeqCst);
        let clock = GuardedClock::open(&db, hand.clone(), 5_000, None).unwrap();
        hand.wall.fetch_add(601_000, Ordering::SeqCst);
        hand.monotonic.fetch_add(601_000, Ordering::SeqCst);
        hand.wall.fetch_add(-3_600_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 1_601_000);
        assert_eq!(clock.take_steps().len(), 1);
    }

    #[test]
    fn a_restart_keeps_the_highest_time_and_reports_a_step_back_while_down() {
        let (_dir, db) = db();
        let hand = Arc::new(Hand::default());
        hand.wall.store(10_000_000, Ordering::SeqCst);
        let clock = GuardedClock::open(&db, hand.clone(), 5_000, None).unwrap();
        hand.wall.fetch_add(2_000, Ordering::SeqCst);
        hand.monotonic.fetch_add(2_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 10_002_000);
        drop(clock);
        hand.wall.store(9_000_000, Ordering::SeqCst);
        let clock = GuardedClock::open(&db, hand.clone(), 5_000, None).unwrap();
        assert_eq!(clock.now_ms(), 10_002_000);
        let steps = clock.take_steps();
        assert_eq!(steps.len(), 1);
        assert!(steps[0].at_start);
        assert_eq!(steps[0].offset_ms(), -1_002_000);
    }
}
