//! How long each phase of a start took: logged with "custodyd ready" and
//! read by the start-up bench (docs/benchmarks.md), so that where a start's
//! time goes is measured, not guessed.

use std::time::{Duration, Instant};

/// The phases of one start, in order, each with its duration.
#[derive(Debug, Clone)]
pub struct StartPhases {
    phases: Vec<(&'static str, Duration)>,
    since: Instant,
}

impl Default for StartPhases {
    fn default() -> Self {
        StartPhases::new()
    }
}

impl StartPhases {
    /// Starts timing the first phase.
    pub fn new() -> StartPhases {
        StartPhases {
            phases: Vec::new(),
            since: Instant::now(),
        }
    }

    /// Ends the phase under way, naming it, and starts the next.
    pub fn done(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push((phase, now - self.since));
        self.since = now;
    }

    /// Every phase ended so far, in order.
    pub fn phases(&self) -> &[(&'static str, Duration)] {
        &self.phases
    }

    /// The phases as one line for the log: `name=12ms name=3ms ...`.
    pub fn describe(&self) -> String {
        self.phases
            .iter()
            .map(|(name, took)| format!("{name}={}ms", took.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
