//! What an officer checks on their own machine rather than takes from the
//! server: a script before the day (`ceremony check`), that the server runs
//! the very script the officer reviewed and that its fingerprint is the hash
//! of the key it sent, and a transcript afterwards (`ceremony
//! verify-transcript`). The offline checks need no connection.

use std::path::Path;

use custody_core::ceremony::bundle::Bundle;
use custody_core::ceremony::fingerprint::{Fingerprint, hex_groups};
use custody_core::ceremony::script::{Kind, Script};
use custody_core::ceremony::transcript::Transcript;
use custody_proto::v1::Ceremony;
use sha2::{Digest, Sha256};

use crate::shared::{read_bytes, read_text, shown};

/// The script file, parsed, and its exact text.
pub(super) fn reviewed(file: &Path) -> Result<(Script, String), String> {
    let text = read_text(file)?;
    let script = Script::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok((script, text))
}

/// Refuses unless the server runs the script this officer reviewed.
pub(super) fn same_script(ceremony: &Ceremony, script: &Script) -> Result<(), String> {
    if ceremony.script_digest != script.digest() {
        return Err(format!(
            "MISMATCH: {} runs a script with digest {}, but the file you reviewed has digest {}: nothing was signed",
            shown(&ceremony.name),
            hex_groups(&ceremony.script_digest),
            hex_groups(&script.digest())
        ));
    }
    Ok(())
}

/// The fingerprint, recomputed here from the public key the server sent;
/// refuses if the server's differs.
pub(super) fn checked_fingerprint(ceremony: &Ceremony) -> Result<Fingerprint, String> {
    let reported = ceremony
        .fingerprint
        .as_ref()
        .ok_or("the ceremony has no key to confirm yet")?;
    let fingerprint = if !ceremony.tbs_der.is_empty() {
        // An intermediate ceremony: the SHA-256 of the TBS, recomputed here.
        Fingerprint::of_der(&ceremony.tbs_der)
    } else if ceremony.public_key_der.is_empty() {
        let kcv: [u8; 3] = reported
            .value
            .as_slice()
            .try_into()
            .map_err(|_| "the key check value is not 3 bytes")?;
        Fingerprint::of_kcv(kcv)
    } else {
        Fingerprint::of_public_key(&ceremony.public_key_der)
    };
    if fingerprint.bytes() != reported.value.as_slice() {
        return Err(format!(
            "MISMATCH: the server reports fingerprint {} but its public key hashes to {}",
            hex_groups(&reported.value),
            fingerprint.hex_groups()
        ));
    }
    Ok(fingerprint)
}

pub(super) fn verify_transcript(file: &Path, audit_key: &Path) -> Result<(), String> {
    let transcript =
        Transcript::from_json(&read_text(file)?).map_err(|e| format!("{}: {e}", file.display()))?;
    let spki = custody_core::encoding::pem_to_der(&read_text(audit_key)?)
        .map_err(|e| format!("{}: {e}", audit_key.display()))?;
    let verified = transcript
        .verify(&spki)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    outln!(
        "transcript of ceremony {} ({}) verifies: {} entries, outcome {}, head {}, signed by the audit key",
        shown(&verified.ceremony),
        shown(&verified.kind),
        verified.entries,
        shown(&verified.outcome),
        verified.head
    );
    Ok(())
}

pub(super) fn check(file: &Path) -> Result<(), String> {
    // The digest is over the file's exact bytes: read them unchanged (no
    // lossy decoding) so what is printed is what officers will sign.
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let script = Script::parse(&text).map_err(|e| e.to_string())?;
    script.check_holders().map_err(|e| e.to_string())?;
    // Every check before any output, so a refused script prints nothing
    // that could be read as a plan.
    let bundle = match script.kind() {
        Kind::Restore {
            bundle,
            bundle_sha256,
            audit_key_sha256,
            ..
        } => {
            let path = file.parent().unwrap_or(Path::new("")).join(bundle);
            let contents = read_bytes(&path).map_err(|e| format!("restore.bundle: {e}"))?;
            let actual: [u8; 32] = Sha256::digest(&contents).into();
            if &actual != bundle_sha256 {
                return Err(format!(
                    "restore.bundle_sha256: {} has SHA-256 {}, not the {} the script names: it is not the bundle that was reviewed",
                    path.display(),
                    hex::encode(actual),
                    hex::encode(bundle_sha256)
                ));
            }
            let signer = bundle_signer(&contents, audit_key_sha256.as_ref())
                .map_err(|e| format!("restore.bundle: {}: {e}", path.display()))?;
            Some((path, signer, audit_key_sha256.is_some()))
        }
        _ => None,
    };
    outln!("{}", script.render_summary());
    outln!(
        "needs the administrative quorum to be at most {}: custodyd refuses it at start if its quorum needs more approvals",
        script.admin_quorum_at_most()
    );
    outln!("");
    outln!("script digest (officers sign this when they sign in):");
    outln!("  {}", hex_groups(&script.digest()));
    if let Some((path, signer, pinned)) = bundle {
        outln!("bundle {} matches bundle_sha256", path.display());
        outln!("bundle signed, it says, by the audit key with SHA-256:");
        outln!("  {}", hex::encode(signer));
        if pinned {
            outln!(
                "  the key restore.audit_key_sha256 pins, and the manifest signature verifies with it"
            );
        } else {
            outln!(
                "  not pinned by this script: custodyd accepts it only if it is its own audit key or one its config pins ([ceremony] trusted_audit_keys); compare it with the SHA-256 the source published"
            );
        }
    }
    outln!("");
    outln!("plan:");
    for line in script.plan() {
        outln!("  {line}");
    }
    Ok(())
}

/// The SHA-256 of the audit key a bundle names as its signer. If the script
/// pins one, it must be that key and the manifest must verify with it;
/// unpinned, only custodyd can say whether it trusts the key.
fn bundle_signer(contents: &[u8], pin: Option<&[u8; 32]>) -> Result<[u8; 32], String> {
    let text = std::str::from_utf8(contents).map_err(|_| "not UTF-8 text".to_owned())?;
    let bundle = Bundle::parse(text).map_err(|e| e.to_string())?;
    let spki = bundle.audit_key_spki().map_err(|e| e.to_string())?;
    let signer: [u8; 32] = Sha256::digest(&spki).into();
    if let Some(pin) = pin {
        if *pin != signer {
            return Err(format!(
                "it names the audit key with SHA-256 {}, not the {} restore.audit_key_sha256 pins: custodyd will refuse it",
                hex::encode(signer),
                hex::encode(pin)
            ));
        }
        bundle.verify(&spki).map_err(|e| e.to_string())?;
    }
    Ok(signer)
}
