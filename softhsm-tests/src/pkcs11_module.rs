//! Fixtures for tests of custody's PKCS#11 module (`pkcs11-module/`,
//! `libcustody_pkcs11.so`): where cargo built it, and its config file,
//! written for a [`TestService`] and a client certificate.
//!
//! The config's path is fixed per token process ([`CONFIG_ENV`] is set by
//! [`crate::with_fresh_token`]), so the module, loaded in the test process
//! or by `pkcs11-tool` and `openssl`, finds it without the test changing its
//! own environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use custody_core::identity::Role;

use crate::service::{ClientFiles, TestService};

/// The environment variable the module reads its config path from.
pub const CONFIG_ENV: &str = "CUSTODY_PKCS11_CONF";

/// The config's file name in the token directory.
pub const CONFIG_FILE: &str = "custody-pkcs11.toml";

/// The module's file name.
pub const LIBRARY: &str = "libcustody_pkcs11.so";

/// The module cargo built for this test or bench binary: next to it
/// (`target/<profile>/deps/`) or one directory up (`target/<profile>/`).
/// softhsm-tests depends on the module's package, so building the tests
/// builds it.
pub fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let deps = exe.parent().expect("the executable's directory");
    let candidates = [
        Some(deps.join(LIBRARY)),
        deps.parent().map(|profile| profile.join(LIBRARY)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{LIBRARY} is not next to {} nor one directory up: build it with \
                 `cargo build -p custody-pkcs11` (a workspace build makes it)",
                exe.display()
            )
        })
}

/// The config path of this token process.
pub fn config_path() -> PathBuf {
    std::env::var_os(CONFIG_ENV)
        .map(PathBuf::from)
        .expect("CUSTODY_PKCS11_CONF is set for a token test's process")
}

/// The module's configuration for one token test.
pub struct ModuleConfig {
    /// The config file.
    pub path: PathBuf,
    /// The module's log file.
    pub log: PathBuf,
    /// The token label (`custody`).
    pub label: String,
}

impl ModuleConfig {
    /// What the module has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Writes the module's config for `service`, presenting a fresh
/// certificate of `principal` with `roles`, showing `keys` (every signing
/// key ListKeys returns if empty).
pub fn write_config(
    service: &TestService,
    principal: &str,
    roles: &[Role],
    keys: &[&str],
) -> ModuleConfig {
    let dir = service.dir().join(format!("pkcs11-{principal}"));
    let ClientFiles { ca, cert, key } = service.client_files(&dir, principal, roles);
    let log = dir.join("module.log");
    let keys = keys
        .iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "log_file = {log:?}\n\n[[server]]\nlabel = \"custody\"\naddress = {:?}\nca_file = {ca:?}\n\
         cert_file = {cert:?}\nkey_file = {key:?}\nkeys = [{keys}]\n",
        service.url()
    );
    let path = config_path();
    std::fs::write(&path, text).expect("write module config");
    ModuleConfig {
        path,
        log,
        label: "custody".into(),
    }
}

/// `pkcs11-tool --module <the module>`.
pub fn pkcs11_tool() -> Command {
    let mut command = Command::new("pkcs11-tool");
    command.arg("--module").arg(library());
    command
}

/// A file's path as a `&str` (test paths are UTF-8).
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}
