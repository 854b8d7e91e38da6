//! Progress for long work (bulk rewraps, drills, restores, backups), drawn
//! on standard error with indicatif only when standard error is a terminal
//! and the output is text: a script, a pipe or a log file gets no bar and
//! no escape codes, only the lines custodyctl prints on standard output.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether bars are drawn: standard error is a terminal, output is text.
fn drawn() -> bool {
    std::io::stderr().is_terminal() && !crate::shared::json()
}

/// A bar over `len` items of `what` (`files rewrapped`).
pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
    bar_on(len, what, drawn())
}

fn bar_on(len: u64, what: &str, drawn: bool) -> ProgressBar {
    if !drawn {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({elapsed}, {eta} left)")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// A spinner with the time spent, while custodyd works on one long call
/// (a drill or restore once the last share is in, a backup).
pub(crate) fn spinner(what: &str) -> ProgressBar {
    spinner_on(what, drawn())
}

fn spinner_on(what: &str, drawn: bool) -> ProgressBar {
    if !drawn {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        spinner.set_style(style);
    }
    spinner.set_message(what.to_string());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off a terminal, or with `--output json`, no bar is drawn: nothing
    /// but custodyctl's own lines reaches standard error.
    #[test]
    fn no_bar_is_drawn_off_a_terminal_or_for_json() {
        let bar = bar_on(3, "files rewrapped", false);
        bar.inc(3);
        assert!(bar.is_hidden());
        let spinner = spinner_on("restoring", false);
        assert!(spinner.is_hidden());
        spinner.finish_and_clear();
        if !std::io::stderr().is_terminal() {
            assert!(!drawn());
            assert!(super::bar(3, "files rewrapped").is_hidden());
        }
        crate::shared::set_json(true);
        assert!(!drawn());
        crate::shared::set_json(false);
    }
}
