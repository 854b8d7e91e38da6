//! systemd credentials in the config: a file path written `credential:NAME`
//! names the file `NAME` in the directory systemd hands custodyd in
//! `$CREDENTIALS_DIRECTORY` (one `LoadCredential=NAME:SOURCE` line of the
//! unit each). The PIN files, TLS key and certificates, and the other files
//! the config names can come this way, so that the unit keeps them out of
//! the environment and readable by this service alone.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError};

/// The prefix that marks a path as a credential's name.
pub const PREFIX: &str = "credential:";

/// The environment variable systemd names the credentials directory in.
pub const DIRECTORY_VARIABLE: &str = "CREDENTIALS_DIRECTORY";

impl Config {
    /// Replaces every `credential:NAME` path by `NAME` in `directory` (the
    /// value of `$CREDENTIALS_DIRECTORY`); an error names the field if a
    /// path names a credential and there is no directory, or if the name
    /// is not a plain file name.
    pub fn resolve_credentials(&mut self, directory: Option<&Path>) -> Result<(), ConfigError> {
        let mut fields: Vec<(&str, &mut PathBuf)> = vec![
            ("[tls] cert", &mut self.tls.cert),
            ("[tls] key", &mut self.tls.key),
            ("[tls] client_ca", &mut self.tls.client_ca),
        ];
        for crl in &mut self.tls.crls {
            fields.push(("[tls] crls", crl));
        }
        let optional = [
            ("[hsm] pin_file", self.hsm.pin_file.as_mut()),
            ("[ceremony] so_pin_file", self.ceremony.so_pin_file.as_mut()),
            (
                "[ceremony] scratch_pin_file",
                self.ceremony.scratch_pin_file.as_mut(),
            ),
            (
                "[dual_control] genesis_file",
                self.dual_control.genesis_file.as_mut(),
            ),
            ("[store] ca", self.store.ca.as_mut()),
            ("[store] cert", self.store.cert.as_mut()),
            ("[store] key", self.store.key.as_mut()),
        ];
        fields.extend(
            optional
                .into_iter()
                .filter_map(|(field, path)| path.map(|path| (field, path))),
        );
        for (field, path) in fields {
            if let Some(resolved) = resolve(field, path, directory)? {
                *path = resolved;
            }
        }
        Ok(())
    }
}

/// The file `path` names if it is `credential:NAME`; None for any other path.
fn resolve(
    field: &str,
    path: &Path,
    directory: Option<&Path>,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(name) = path.to_str().and_then(|p| p.strip_prefix(PREFIX)) else {
        return Ok(None);
    };
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && name.chars().all(|c| !c.is_control());
    if !plain {
        return Err(ConfigError(format!(
            "{field}: {path:?} must name a credential by a plain file name (credential:NAME, as in the unit's LoadCredential=NAME:...)"
        )));
    }
    let Some(directory) = directory.filter(|d| !d.as_os_str().is_empty()) else {
        return Err(ConfigError(format!(
            "{field}: {path:?} names a systemd credential, but ${DIRECTORY_VARIABLE} is not set (start custodyd from its unit, or give a file path)"
        )));
    };
    Ok(Some(directory.join(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_resolve_in_the_directory_and_nothing_else_changes() {
        let dir = Path::new("/run/credentials/custodyd.service");
        assert_eq!(
            resolve("f", Path::new("credential:hsm.pin"), Some(dir)).unwrap(),
            Some(dir.join("hsm.pin"))
        );
        assert_eq!(
            resolve("f", Path::new("/etc/custody/hsm.pin"), Some(dir)).unwrap(),
            None
        );
        assert_eq!(
            resolve("f", Path::new("credentials/hsm.pin"), None).unwrap(),
            None
        );
    }

    #[test]
    fn a_credential_outside_the_directory_or_without_one_is_refused() {
        let dir = Path::new("/run/credentials/custodyd.service");
        for bad in [
            "credential:",
            "credential:..",
            "credential:../hsm.pin",
            "credential:a/b",
        ] {
            let error = resolve("[hsm] pin_file", Path::new(bad), Some(dir)).unwrap_err();
            assert!(error.0.contains("[hsm] pin_file"), "{error}");
        }
        let error = resolve("[hsm] pin_file", Path::new("credential:hsm.pin"), None).unwrap_err();
        assert!(error.0.contains(DIRECTORY_VARIABLE), "{error}");
    }
}
