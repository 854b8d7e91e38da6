//! The custodyctl binary as an operator runs it (threat model O7, O8): a
//! named profile's settings, overridden by an environment variable and then
//! by a flag, reach the connection, and an error about a file says which
//! profile supplied it; completions and the man page come out of the binary
//! itself. No server is needed: the connection stops at the first file it
//! cannot read, and names it.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::Path;
use std::process::{Command, Output};

const CUSTODYCTL: &str = env!("CARGO_BIN_EXE_custodyctl");

/// custodyctl with `args`, no connection setting inherited from the
/// environment running the tests, `env` added.
fn custodyctl(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(CUSTODYCTL);
    command.current_dir(dir).args(args);
    for var in [
        "CUSTODY_SERVER",
        "CUSTODY_CA",
        "CUSTODY_CERT",
        "CUSTODY_KEY",
        "CUSTODY_PROFILE",
        "CUSTODY_CONFIG",
    ] {
        command.env_remove(var);
    }
    command.env("XDG_CONFIG_HOME", dir.join("no-config-here"));
    command.envs(env.iter().copied());
    command.output().unwrap()
}

/// The error custodyctl printed, checking that it failed.
fn refusal(output: &Output) -> String {
    assert!(!output.status.success(), "custodyctl succeeded: {output:?}");
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[test]
fn a_profile_reaches_the_connection_below_environment_and_flags_and_is_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("custodyctl.toml");
    std::fs::write(
        &config,
        "default_profile = \"bob\"\n\
         [profiles.alice]\nserver = \"https://127.0.0.1:9\"\n\
         ca = \"alice-ca.pem\"\ncert = \"alice.pem\"\nkey = \"alice.key\"\n\
         [profiles.bob]\nserver = \"https://127.0.0.1:9\"\n\
         ca = \"bob-ca.pem\"\ncert = \"bob.pem\"\nkey = \"bob.key\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let alice_ca = dir.path().join("alice-ca.pem");
    let alice_ca = alice_ca.display();

    // --profile: its CA file, relative to the config file, and where it
    // came from.
    let words = refusal(&custodyctl(
        dir.path(),
        &["--config", config, "--profile", "alice", "keys", "list"],
        &[],
    ));
    assert!(
        words.contains(&format!("the CA file {alice_ca}")),
        "{words}"
    );
    assert!(
        words.contains(&format!(
            "server, ca, cert, key from profile \"alice\" of {config}"
        )),
        "{words}"
    );

    // No --profile: the file's default profile.
    let words = refusal(&custodyctl(
        dir.path(),
        &["--config", config, "keys", "list"],
        &[],
    ));
    assert!(words.contains("bob-ca.pem"), "{words}");

    // CUSTODY_PROFILE selects as --profile does.
    let words = refusal(&custodyctl(
        dir.path(),
        &["--config", config, "keys", "list"],
        &[("CUSTODY_PROFILE", "alice")],
    ));
    assert!(words.contains("alice-ca.pem"), "{words}");

    // The environment wins over the profile, and the profile is then not
    // said to have supplied the CA.
    let words = refusal(&custodyctl(
        dir.path(),
        &["--config", config, "--profile", "alice", "keys", "list"],
        &[("CUSTODY_CA", "/nonexistent/env-ca.pem")],
    ));
    assert!(words.contains("/nonexistent/env-ca.pem"), "{words}");
    assert!(words.contains("server, cert, key from profile"), "{words}");

    // A flag wins over both.
    let words = refusal(&custodyctl(
        dir.path(),
        &[
            "--config",
            config,
            "--profile",
            "alice",
            "--ca",
            "/nonexistent/flag-ca.pem",
            "keys",
            "list",
        ],
        &[("CUSTODY_CA", "/nonexistent/env-ca.pem")],
    ));
    assert!(words.contains("/nonexistent/flag-ca.pem"), "{words}");

    // An unknown profile is named with the ones the file has.
    let words = refusal(&custodyctl(
        dir.path(),
        &["--config", config, "--profile", "carol", "keys", "list"],
        &[],
    ));
    assert!(
        words.contains("no profile \"carol\"") && words.contains("alice, bob"),
        "{words}"
    );

    // Nothing names a CA: the flag, variable and profile to use are named.
    let words = refusal(&custodyctl(dir.path(), &["keys", "list"], &[]));
    assert!(
        words.contains("--ca") && words.contains("CUSTODY_CA") && words.contains("--profile"),
        "{words}"
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let output = custodyctl(dir.path(), &["completions", shell], &[]);
        assert!(output.status.success(), "{shell}: {output:?}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(
            script.contains("custodyctl") && script.contains("ceremony"),
            "{shell}"
        );
    }
    let output = custodyctl(dir.path(), &["completions", "tcsh"], &[]);
    assert!(!output.status.success(), "an unknown shell is refused");

    let output = custodyctl(dir.path(), &["man"], &[]);
    assert!(output.status.success(), "{output:?}");
    let page = String::from_utf8(output.stdout).unwrap();
    assert!(page.contains(".TH custodyctl"), "{page}");
    let pages = dir.path().join("man");
    let output = custodyctl(
        dir.path(),
        &["man", "--out-dir", pages.to_str().unwrap()],
        &[],
    );
    assert!(output.status.success(), "{output:?}");
    assert!(pages.join("custodyctl-keys-list.1").is_file());
}
