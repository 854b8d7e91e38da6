//! The module's log: one line per event, appended to the configured
//! `log_file` or written to standard error. It never holds secrets: the
//! module has none (the client key is read once into the TLS identity), and
//! it logs key names, mechanisms and custody's reasons only.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// Where log lines go.
pub struct Log {
    file: Option<Mutex<std::fs::File>>,
}

impl Log {
    /// A log appending to `path`, or to standard error.
    pub fn open(path: Option<&Path>) -> Result<Log, String> {
        let file = match path {
            None => None,
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?,
            )),
        };
        Ok(Log { file })
    }

    /// Writes one line at `level` (`INFO`, `WARN`, `ERROR`).
    pub fn line(&self, level: &str, message: &str) {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let line = format!("{time} {level} custody-pkcs11: {message}\n");
        match &self.file {
            Some(file) => {
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                let _ = file.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }
}

/// A line to standard error, for when there is no configured log yet.
pub fn early(message: &str) {
    let _ = writeln!(std::io::stderr(), "custody-pkcs11: {message}");
}
