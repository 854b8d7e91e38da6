//! The systemd unit `deploy/systemd/custodyd.service` (threat model O1):
//! `systemd-analyze verify` accepts it, it has every hardening line the
//! runbook promises, `systemd-analyze security` rates its exposure no worse
//! than docs/runbook.md records, and no secret is in its environment.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::PathBuf;
use std::process::Command;

const UNIT: &str = include_str!("../../deploy/systemd/custodyd.service");
const RUNBOOK: &str = include_str!("../../docs/runbook.md");

/// The unit with ExecStart on the custodyd this test build made (verify
/// checks that the program exists), written as `custodyd.service` (verify
/// checks the name too).
fn unit_here() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custodyd.service");
    let unit = UNIT.replace("/usr/bin/custodyd", env!("CARGO_BIN_EXE_custodyd"));
    assert_ne!(unit, UNIT, "the unit starts /usr/bin/custodyd");
    std::fs::write(&path, unit).unwrap();
    (dir, path)
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze runs (deploy/install-deps.sh installs Debian's systemd)")
}

/// The unit's `Key=value` lines (comments and sections left out).
fn settings() -> Vec<(&'static str, &'static str)> {
    UNIT.lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .collect()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let (_dir, path) = unit_here();
    let output = analyze(&["verify", path.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !said.contains("custodyd"),
        "systemd-analyze verify: {}\n{said}",
        output.status
    );
}

#[test]
fn the_unit_is_hardened_as_the_runbook_says() {
    let settings = settings();
    let has = |key: &str, value: &str| settings.iter().any(|(k, v)| *k == key && *v == value);
    for (key, value) in [
        ("Type", "notify"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/custody"),
        ("StateDirectory", "custody"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("User", "custody"),
        ("LimitCORE", "0"),
        ("LoadCredential", "hsm.pin:/etc/custody/credentials/hsm.pin"),
    ] {
        assert!(has(key, value), "the unit lacks {key}={value}");
    }
    // The state directory is the one writable path.
    let writable: Vec<_> = settings
        .iter()
        .filter(|(k, _)| *k == "ReadWritePaths")
        .collect();
    assert_eq!(writable.len(), 1, "{writable:?}");
    // Secrets come as credentials, never in the environment.
    for (key, value) in &settings {
        if key.starts_with("Environment") {
            let value = value.to_ascii_lowercase();
            assert!(
                !["pin", "key", "secret", "password"]
                    .iter()
                    .any(|word| value.contains(word)),
                "a secret in the unit's environment: {key}={value}"
            );
        }
    }
}

#[test]
fn the_exposure_score_is_no_worse_than_the_runbook_records() {
    let (_dir, path) = unit_here();
    let output = analyze(&["security", "--offline=yes", path.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&output.stdout);
    let score: f64 = said
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for custodyd.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {said}"));
    let recorded: f64 = RUNBOOK
        .lines()
        .find_map(|line| line.split_once("exposure level: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .expect("docs/runbook.md records the unit's exposure level: N.N");
    assert!(
        score <= recorded,
        "the unit's exposure level is {score}, worse than the {recorded} the runbook records"
    );
}
