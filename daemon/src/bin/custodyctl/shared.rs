//! What every command group repeats, in one place: printing to standard
//! output, the mTLS channel from the global options, gRPC errors as text,
//! resource names, hex options, reading and writing files, the officer key
//! and its passphrase, questions typed back at the terminal, and how a
//! command's result becomes the exit status.
//!
//! Every error is a `String` that `main` prints after `custodyctl: ` and
//! turns into exit status 1; clap's own usage errors keep its status 2.

/// Writes to standard output. A closed pipe (`custodyctl keys list | head`)
/// ends the program quietly, as in other command-line tools, instead of the
/// panic `println!` gives.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::shared::write_stdout(format_args!($($arg)*), false)
    };
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::shared::write_stdout(format_args!($($arg)*), true)
    };
}

use std::path::Path;
use std::process::ExitCode;

use custody_core::dual_control::officer_key::{OfficerKey, SealedOfficerKey};
use secrecy::SecretString;
use tonic::transport::Channel;

use crate::Connection;

/// Text custodyd (or any file or peer) sent, as it may be printed: every
/// control, bidi, zero-width or separator character written out as
/// `\u{…}` (`custody_core::text::escape`), so that nothing it holds can move
/// the cursor, rewrite a line or reorder what an officer reads. Every
/// server-provided string custodyctl prints goes through here.
pub(crate) fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    custody_core::text::escape(text)
}

/// Writes `text` to standard output. As a last guard, any control
/// character but the line breaks custodyctl itself writes is escaped, in
/// case a string reached a format without [`shown`].
pub(crate) fn write_stdout(text: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let text = text.to_string();
    let text = guarded(&text);
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_all(text.as_bytes()).and_then(|()| {
        if newline {
            stdout.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(error) = written {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // Nowhere left to report it but standard error.
        eprintln!("custodyctl: writing the output: {error}");
        std::process::exit(1);
    }
}

/// `text` with every hidden character but `\n` escaped.
fn guarded(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c != '\n' && custody_core::text::is_hidden(c))
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let lines: Vec<std::borrow::Cow<'_, str>> = text.split('\n').map(shown).collect();
    std::borrow::Cow::Owned(lines.join("\n"))
}

/// Whether read commands print JSON (`--output json`), set once by `main`.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes read commands print JSON.
pub(crate) fn set_json(json: bool) {
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `--output json` was asked for.
pub(crate) fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// `value` as JSON text, with every hidden character (bidi, zero-width, C1
/// controls, which serde_json leaves as they are) written as a `\uXXXX`
/// escape: still the same JSON, and nothing in it acts on a terminal.
pub(crate) fn json_text(value: &serde_json::Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into());
    let mut safe = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && custody_core::text::is_hidden(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                safe.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            safe.push(c);
        }
    }
    safe
}

/// Prints `value` as JSON on standard output.
pub(crate) fn print_json(value: &serde_json::Value) {
    outln!("{}", json_text(value));
}

/// The bytes of a hex option (`--digest`, `--public-key`), surrounding
/// whitespace ignored; an error names the option.
pub(crate) fn hex_arg(flag: &str, text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text.trim()).map_err(|e| format!("{flag} is not hex: {e}"))
}

/// The exit status of a finished command, its error reported on standard
/// error.
pub(crate) fn exit_code(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("custodyctl: {}", guarded(&error));
            ExitCode::FAILURE
        }
    }
}

/// The mTLS channel to custodyd from the global options; a missing one is
/// named by its flag and its environment variable, and a failed connection
/// says which certificate or file is at fault
/// (`custody_daemon::client::connect_files`).
pub(crate) async fn channel(connection: &Connection) -> Result<Channel, String> {
    let resolved = crate::profile::resolve(connection)?;
    let need = |option: Option<std::path::PathBuf>, flag: &str, var: &str| {
        option.ok_or_else(|| format!("give {flag} (or set {var}, or use a --profile that sets it)"))
    };
    let files = custody_daemon::client::ClientFiles {
        ca: need(resolved.ca, "--ca", "CUSTODY_CA")?,
        cert: need(resolved.cert, "--cert", "CUSTODY_CERT")?,
        key: need(resolved.key, "--key", "CUSTODY_KEY")?,
    };
    custody_daemon::client::connect_files(&resolved.server, &files)
        .await
        .map_err(|error| match &resolved.supplied {
            Some(supplied) => format!("{error} [{supplied}]"),
            None => error,
        })
}

/// A gRPC error as `Code [REASON]: message`, the reason from the error
/// details when custodyd sent one.
pub(crate) fn status(error: tonic::Status) -> String {
    let code = format!("{:?}", error.code());
    let details = tonic_types::StatusExt::get_error_details(&error);
    match details.error_info() {
        Some(info) => format!(
            "{code} [{}]: {}",
            shown(&info.reason),
            shown(error.message())
        ),
        None => format!("{code}: {}", shown(error.message())),
    }
}

/// Refuses bytes whose CRC32C is not the one custodyd sent with them.
pub(crate) fn check_crc(bytes: &[u8], crc: u32, what: &str) -> Result<(), String> {
    if crc32c::crc32c(bytes) == crc {
        Ok(())
    } else {
        Err(format!(
            "the {what} was corrupted in transit (CRC32C mismatch)"
        ))
    }
}

/// A resource name from a name given with or without its collection
/// prefix (`prefix` ends with `/`).
pub(crate) fn full_name(prefix: &str, name: &str) -> String {
    if name.starts_with(prefix) {
        name.to_string()
    } else {
        format!("{prefix}{name}")
    }
}

/// `keys/...` from a name given with or without its `keys/` prefix.
pub(crate) fn key_name(name: &str) -> String {
    full_name("keys/", name)
}

pub(crate) fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a file readable by its owner only (0600), whatever it holds:
/// bundles, transcripts, signatures, exports. An existing file is narrowed
/// to 0600 before it is written over.
pub(crate) fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    file.set_len(0).map_err(fail)?;
    file.write_all(contents.as_ref()).map_err(fail)
}

/// Creates a new file only its owner can read; an existing file is never
/// overwritten, so a secret cannot land in a file others already read.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(contents)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Prints `prompt` and reads one line typed back, newline included.
pub(crate) fn ask(prompt: std::fmt::Arguments<'_>) -> Result<String, String> {
    out!("{prompt}");
    std::io::Write::flush(&mut std::io::stdout()).map_err(|e| e.to_string())?;
    let mut typed = String::new();
    std::io::stdin()
        .read_line(&mut typed)
        .map_err(|e| e.to_string())?;
    Ok(typed)
}

/// Reads a sealed officer key file.
pub(crate) fn sealed_officer_key(path: &Path) -> Result<SealedOfficerKey, String> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| format!("{}: not an officer key file: {e}", path.display()))
}

/// Unseals an officer key with its passphrase.
pub(crate) fn unseal(sealed: &SealedOfficerKey) -> Result<OfficerKey, String> {
    OfficerKey::unseal(
        sealed,
        &passphrase(
            &format!("passphrase of officer {}: ", sealed.officer_id),
            false,
        )?,
    )
}

/// The officer key in a sealed key file, unsealed.
pub(crate) fn officer_key(path: &Path) -> Result<OfficerKey, String> {
    unseal(&sealed_officer_key(path)?)
}

/// The passphrase from `CUSTODY_OFFICER_PASSPHRASE`, or asked for without echo.
pub(crate) fn passphrase(prompt: &str, confirm: bool) -> Result<SecretString, String> {
    if let Ok(value) = std::env::var("CUSTODY_OFFICER_PASSPHRASE") {
        return Ok(SecretString::from(value));
    }
    let first =
        rpassword::prompt_password(prompt).map_err(|e| format!("reading the passphrase: {e}"))?;
    if confirm {
        let again = rpassword::prompt_password("again: ")
            .map_err(|e| format!("reading the passphrase: {e}"))?;
        if again != first {
            return Err("the passphrases differ".into());
        }
    }
    Ok(SecretString::from(first))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// What custodyd sends can rewrite nothing on the officer's terminal:
    /// `shown` escapes every hidden character, line breaks included, and the
    /// output guard everything but custodyctl's own line breaks.
    #[test]
    fn server_text_never_reaches_the_terminal_raw() {
        assert_eq!(shown("keys/root-ca"), "keys/root-ca");
        assert_eq!(
            shown("a\r\x1b[2Kb\n\u{202e}c"),
            "a\\u{d}\\u{1b}[2Kb\\u{a}\\u{202e}c"
        );
        assert_eq!(
            guarded("line one\nline\x1b[8m two\r\n"),
            "line one\nline\\u{1b}[8m two\\u{d}\n"
        );
        assert_eq!(guarded("plain\n"), "plain\n");
    }

    #[test]
    fn outputs_are_readable_by_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("bundle.json");
        write_file(&fresh, "{\"bundle\":1}").unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o600);
        // A file that was world-readable is narrowed before it is written over.
        let old = dir.path().join("transcript.json");
        std::fs::write(&old, "a much longer earlier content").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&old, "new").unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "new");
        let secret = dir.path().join("share.txt");
        write_private(&secret, b"share").unwrap();
        assert_eq!(mode(&secret), 0o600);
    }
}
