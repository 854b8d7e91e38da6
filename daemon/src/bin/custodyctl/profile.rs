//! Named profiles: a config file says, per name, which custodyd to reach and
//! with which files, so that `--profile alice` replaces four options.
//!
//! The file is `--config` (or `CUSTODY_CONFIG`), else
//! `$XDG_CONFIG_HOME/custody/custodyctl.toml`, else
//! `~/.config/custody/custodyctl.toml`; a missing default file is no error.
//!
//! ```toml
//! default_profile = "alice"      # used when no --profile is given
//! [profiles.alice]
//! server = "https://custody.example:7443"
//! ca = "ca.pem"                  # relative to this file's directory
//! cert = "alice.pem"
//! key = "alice.key"
//! ```
//!
//! Each setting is taken from, first to last: its flag (`--server`), its
//! environment variable (`CUSTODY_SERVER`), the profile, the built-in
//! default (`https://localhost:7443` for the server, none for the files).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Connection;

/// The server custodyctl reaches when nothing else names one.
pub(crate) const DEFAULT_SERVER: &str = "https://localhost:7443";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    server: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Where custodyctl connects and with which files, every source applied.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub(crate) server: String,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    /// Which settings a profile supplied, and from where (for example
    /// `ca, cert, key from profile "alice" of /home/a/custodyctl.toml`), so
    /// that an error about a file says where to fix it, not only its flag.
    pub(crate) supplied: Option<String>,
}

/// The default config file, from the XDG base directory rules.
fn default_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("custody").join("custodyctl.toml"))
}

/// `connection` (flags, then environment) completed from the profile.
pub(crate) fn resolve(connection: &Connection) -> Result<Resolved, String> {
    let (path, explicit) = match &connection.config {
        Some(path) => (Some(path.clone()), true),
        None => (default_config(), false),
    };
    resolve_with(connection, path.as_deref(), explicit)
}

fn resolve_with(
    connection: &Connection,
    path: Option<&Path>,
    explicit: bool,
) -> Result<Resolved, String> {
    let file = match path {
        Some(path) if explicit || path.exists() => Some((path, read(path)?)),
        _ => None,
    };
    let mut profile_name = None;
    let profile = match (&connection.profile, &file) {
        (Some(name), Some((path, config))) => Some(
            config
                .profiles
                .get(name)
                .cloned()
                .map(|p| {
                    profile_name = Some((name.clone(), path.to_path_buf()));
                    relative_to(p, path)
                })
                .ok_or_else(|| {
                    let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
                    format!(
                        "{} has no profile {name:?} (it has: {})",
                        path.display(),
                        known.join(", ")
                    )
                })?,
        ),
        (Some(name), None) => {
            return Err(format!(
                "--profile {name:?} needs a config file: give --config or write {}",
                default_config().map_or("~/.config/custody/custodyctl.toml".into(), |p| p
                    .display()
                    .to_string())
            ));
        }
        (None, Some((path, config))) => match &config.default_profile {
            Some(name) => Some(
                config
                    .profiles
                    .get(name)
                    .cloned()
                    .map(|p| {
                        profile_name = Some((name.clone(), path.to_path_buf()));
                        relative_to(p, path)
                    })
                    .ok_or_else(|| {
                        format!(
                            "{}: default_profile {name:?} is not one of its profiles",
                            path.display()
                        )
                    })?,
            ),
            None => None,
        },
        (None, None) => None,
    }
    .unwrap_or_default();
    let supplied = profile_name.and_then(|(name, path)| {
        let from_profile: Vec<&str> = [
            (
                "server",
                connection.server.is_none() && profile.server.is_some(),
            ),
            ("ca", connection.ca.is_none() && profile.ca.is_some()),
            ("cert", connection.cert.is_none() && profile.cert.is_some()),
            ("key", connection.key.is_none() && profile.key.is_some()),
        ]
        .into_iter()
        .filter_map(|(setting, taken)| taken.then_some(setting))
        .collect();
        (!from_profile.is_empty()).then(|| {
            format!(
                "{} from profile {name:?} of {}",
                from_profile.join(", "),
                path.display()
            )
        })
    });
    Ok(Resolved {
        server: connection
            .server
            .clone()
            .or(profile.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_string()),
        ca: connection.ca.clone().or(profile.ca),
        cert: connection.cert.clone().or(profile.cert),
        key: connection.key.clone().or(profile.key),
        supplied,
    })
}

fn read(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// The profile with its relative paths taken from the config file's directory.
fn relative_to(mut profile: Profile, config: &Path) -> Profile {
    let dir = config.parent().unwrap_or(Path::new("."));
    for path in [&mut profile.ca, &mut profile.cert, &mut profile.key]
        .into_iter()
        .flatten()
    {
        if path.is_relative() {
            *path = dir.join(&*path);
        }
    }
    profile
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    fn connection(profile: Option<&str>) -> Connection {
        Connection {
            server: None,
            ca: None,
            cert: None,
            key: None,
            profile: profile.map(String::from),
            config: None,
        }
    }

    /// A profile supplies what flags and environment leave unset; a flag
    /// (or its environment variable, which clap has already applied) wins
    /// over the profile; relative paths are the config file's.
    #[test]
    fn a_profile_fills_in_what_flags_and_environment_leave_unset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("custodyctl.toml");
        std::fs::write(
            &path,
            "default_profile = \"bob\"\n\
             [profiles.alice]\nserver = \"https://alice.example:7443\"\n\
             ca = \"ca.pem\"\ncert = \"/etc/alice.pem\"\nkey = \"alice.key\"\n\
             [profiles.bob]\nserver = \"https://bob.example:7443\"\n",
        )
        .unwrap();
        let alice = resolve_with(&connection(Some("alice")), Some(&path), true).unwrap();
        assert_eq!(
            alice,
            Resolved {
                server: "https://alice.example:7443".into(),
                ca: Some(dir.path().join("ca.pem")),
                cert: Some("/etc/alice.pem".into()),
                key: Some(dir.path().join("alice.key")),
                supplied: Some(format!(
                    "server, ca, cert, key from profile \"alice\" of {}",
                    path.display()
                )),
            }
        );
        let mut flagged = connection(Some("alice"));
        flagged.server = Some("https://flag.example:1".into());
        flagged.cert = Some("mine.pem".into());
        let resolved = resolve_with(&flagged, Some(&path), true).unwrap();
        assert_eq!(resolved.server, "https://flag.example:1");
        assert_eq!(resolved.cert, Some("mine.pem".into()));
        assert_eq!(resolved.key, Some(dir.path().join("alice.key")));
        assert_eq!(
            resolved.supplied,
            Some(format!(
                "ca, key from profile \"alice\" of {}",
                path.display()
            ))
        );
        // No --profile: the file's default profile.
        let default = resolve_with(&connection(None), Some(&path), true).unwrap();
        assert_eq!(default.server, "https://bob.example:7443");
        // An unknown profile is named with the file and the profiles it has.
        let error = resolve_with(&connection(Some("carol")), Some(&path), true).unwrap_err();
        assert!(
            error.contains("no profile \"carol\"") && error.contains("alice, bob"),
            "{error}"
        );
        // No file at the default place: built-in defaults, no error.
        let missing = dir.path().join("absent.toml");
        let bare = resolve_with(&connection(None), Some(&missing), false).unwrap();
        assert_eq!(bare.server, DEFAULT_SERVER);
        assert_eq!(bare.supplied, None);
        assert!(resolve_with(&connection(None), Some(&missing), true).is_err());
        // A misspelt setting is refused, not ignored.
        std::fs::write(&path, "[profiles.alice]\nsever = \"x\"\n").unwrap();
        let error = resolve_with(&connection(Some("alice")), Some(&path), true).unwrap_err();
        assert!(error.contains("sever"), "{error}");
    }
}
