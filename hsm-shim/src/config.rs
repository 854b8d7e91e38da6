//! How to reach the HSM: module path, token, PIN, worker count.
//!
//! The PIN is read from a file or an environment variable (never from the
//! config file itself) into a [`SecretString`], whose `Debug` is redacted and
//! whose memory is zeroed on drop. It is exposed only at the `C_Login` call.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::error::{ErrorKind, HsmError, Result};

/// Which token of the module to use. Slot ids are not stable (SoftHSM2
/// renumbers them when tokens are added), so tokens are found by label or serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token whose label (`CKA_LABEL` of the token, trailing spaces ignored) matches.
    Label(String),
    /// The token whose serial number matches.
    Serial(String),
}

/// Where the user PIN comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN; one trailing newline is ignored.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    /// Reads the PIN. The error names the source, never the content.
    pub fn load(&self) -> Result<SecretString> {
        let raw = match self {
            PinSource::File(path) => {
                Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    HsmError::new(
                        ErrorKind::Configuration,
                        format!("cannot read PIN file {}: {e}", path.display()),
                    )
                })?)
            }
            PinSource::Env(var) => Zeroizing::new(std::env::var(var).map_err(|_| {
                HsmError::new(
                    ErrorKind::Configuration,
                    format!("PIN environment variable {var} is not set or not UTF-8"),
                )
            })?),
        };
        let pin = raw.strip_suffix('\n').unwrap_or(&raw);
        let pin = pin.strip_suffix('\r').unwrap_or(pin);
        if pin.is_empty() {
            return Err(HsmError::new(
                ErrorKind::Configuration,
                format!("PIN from {self:?} is empty"),
            ));
        }
        Ok(SecretString::from(pin))
    }
}

/// Everything needed to open the HSM.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (for SoftHSM2 on Debian:
    /// `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token to use.
    pub token: TokenSelector,
    /// The user PIN (already loaded; see [`PinSource::load`]).
    pub pin: SecretString,
    /// How many worker threads, each with its own logged-in session, serve
    /// [`crate::Hsm::run`]. See `docs/architecture.md` for how the default was chosen.
    pub workers: usize,
    /// Most requests that may wait for a worker before
    /// [`crate::Hsm::try_run`] refuses more ([`crate::ErrorKind::Busy`]); a
    /// job of [`crate::Hsm::try_run_batch`] counts the requests it holds.
    pub max_queued: usize,
    /// The deadline of every PKCS#11 call a pool worker makes: a call still
    /// running after it makes its worker lost, fails its job with
    /// [`crate::ErrorKind::Timeout`] and starts a fresh worker (see
    /// `watchdog.rs`). More than zero, at most
    /// [`crate::MAX_CALL_TIMEOUT`]; [`crate::Hsm::open`] refuses others.
    pub call_timeout: Duration,
}

impl HsmConfig {
    /// The worker count measured to serve SoftHSM2 best on a 2-core machine;
    /// see `docs/benchmarks.md`.
    pub const DEFAULT_WORKERS: usize = 2;

    /// Jobs that may wait for a worker by default: at the pool's measured
    /// rates (docs/benchmarks.md) a full queue drains in well under a
    /// second.
    pub const DEFAULT_MAX_QUEUED: usize = 1024;

    /// The default call deadline: far beyond any call custody makes on a
    /// healthy HSM (an RSA-4096 key generation on SoftHSM2 takes a few
    /// seconds), short enough that a hung network HSM is noticed while
    /// clients still wait.
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

    /// A config with the default worker count.
    pub fn new(module: impl Into<PathBuf>, token: TokenSelector, pin: SecretString) -> Self {
        Self {
            module: module.into(),
            token,
            pin,
            workers: Self::DEFAULT_WORKERS,
            max_queued: Self::DEFAULT_MAX_QUEUED,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn debug_output_never_contains_the_pin() {
        let config = HsmConfig::new(
            "/usr/lib/softhsm/libsofthsm2.so",
            TokenSelector::Label("dev".into()),
            SecretString::from("s3cret-pin-4711"),
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-pin-4711"), "{shown}");
        assert!(shown.contains("dev"));
    }

    #[test]
    fn pin_file_loses_one_trailing_newline_only() {
        let dir = std::env::temp_dir().join(format!("hsm-shim-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pin");
        std::fs::write(&path, "1234 5678\n").unwrap();
        let pin = PinSource::File(path.clone()).load().unwrap();
        assert_eq!(pin.expose_secret(), "1234 5678");

        std::fs::write(&path, "\n").unwrap();
        let err = PinSource::File(path.clone()).load().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration);

        let missing = PinSource::File(dir.join("absent")).load().unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::Configuration);
        assert!(missing.to_string().contains("absent"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
