//! Backup bundles: the keys a KEK ceremony exports, wrapped (RFC 5649) under
//! the backup KEK, with a manifest the audit key signs.
//!
//! A bundle is a JSON file that travels and is stored outside the HSM, and is
//! the only input a restore starts from. So before anything reaches the HSM:
//!
//! - [`Bundle::parse`] refuses a file that is not exactly this format: unknown
//!   fields, hex that is not lower-case hex of the right length, key ids or
//!   allowed signers the service would refuse, versions below 1, the same
//!   (key, version) twice, unknown algorithm or state names, a key pair whose
//!   public key does not hash to its fingerprint, an AES key without the
//!   check ciphertext that proves the unwrapped key is the right one.
//! - [`Bundle::verify`] checks the manifest signature with the audit key the
//!   verifier trusts (given separately, from its own configuration); the PEM
//!   in the file is not trusted, only required to be that same key.
//!
//! The signature covers [`manifest_message`]: a domain line and the SHA-256
//! of the manifest's canonical JSON (serde_json's compact output, fields in
//! declared order, `None` as `null`). The bundle's own `signature` and
//! `audit_key_pem` are outside the manifest.
//!
//! This module is pure: no HSM and no I/O. The engine signs
//! [`Bundle::signing_message`] with the audit key and stores the DER
//! signature with [`Bundle::set_signature`].

use std::collections::{BTreeMap, BTreeSet};

use p256::ecdsa::VerifyingKey;
use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::algorithms::KeyAlgorithm;
use crate::dual_control::quorum::Quorum;
use crate::encoding::{lower_hex, pem_to_der};

/// The principal [`KeyProtections::officer_principals`] records for an
/// officer a policy names who was not enrolled at the source.
pub const NOT_ENROLLED: &str = "";

/// The manifest format. v2 carries each key's protections (I3).
pub const FORMAT: &str = "custody-backup/v2";
/// Formats of older custodyd releases, refused with a reason: a v1 manifest
/// does not carry the keys' policies, minimum versions, cryptoperiods or
/// legal holds, so no restore from it could reproduce them.
pub const OLDER_FORMATS: [&str; 1] = ["custody-backup/v1"];
/// What an AES key's check ciphertext decrypts to.
pub const CHECK_PLAINTEXT: &[u8] = b"custody-restore-check/v1";
const MANIFEST_DOMAIN: &[u8] = b"custody-backup-manifest/v1\n";
const GCM_IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;
/// RFC 5649 output is whole 8-byte blocks, at least two.
const WRAP_BLOCK: usize = 8;
const KCV_LEN: usize = 3;
const SET_ID_LEN: usize = 4;
const MAX_SHARES: u8 = 99;
/// As many allowed signers as a key may have (the service's limit).
const MAX_SIGNERS: usize = 256;

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The text is not bundle JSON (syntax, a missing or unknown field).
    #[error("not a backup bundle: {0}")]
    Json(String),
    /// A field breaks a rule of the format.
    #[error("{field}: {problem}")]
    Invalid {
        /// Where, as a JSON path: `manifest.keys[1].fingerprint`.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// The audit key given to verify with is not an EC P-256 public key.
    #[error("audit key: not an EC P-256 SubjectPublicKeyInfo: {0}")]
    AuditKey(String),
    /// The bundle names a different audit key from the one it is verified with.
    #[error(
        "the bundle's audit_key_pem (SPKI SHA-256 {embedded}) is not the audit key given \
         (SPKI SHA-256 {given}): the bundle comes from another custodyd, or its key was replaced"
    )]
    AuditKeyMismatch {
        /// SHA-256 of the embedded key's SPKI DER, hex.
        embedded: String,
        /// SHA-256 of the given key's SPKI DER, hex.
        given: String,
    },
    /// The manifest signature is malformed or does not verify.
    #[error("manifest signature {0}")]
    Signature(String),
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> BundleError {
    BundleError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A backup bundle file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// What the bundle holds (signed).
    pub manifest: Manifest,
    /// DER ECDSA P-256 signature by the audit key over [`manifest_message`], hex.
    pub signature: String,
    /// The audit key's public key, PEM (for reference: a verifier uses the
    /// key it trusts and requires this to be the same).
    pub audit_key_pem: String,
}

/// The signed description of a bundle's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// When the backup was made, RFC 3339.
    pub created: String,
    /// The token the keys came from: "label (serial ...)".
    pub source_token: String,
    /// The KEK the keys are wrapped under.
    pub backup_kek: BackupKekRef,
    /// The key versions.
    pub keys: Vec<BundledKey>,
    /// The protections of each key that has versions in `keys`, one entry
    /// per key id, in the order the keys first appear (I3: a restore
    /// reproduces them exactly).
    pub protections: Vec<KeyProtections>,
}

/// What protects a key at the source, restored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyProtections {
    /// The key id.
    pub key_id: String,
    /// The version used when none is named.
    pub primary_version: u32,
    /// The principals allowed to use the key.
    pub allowed_signers: Vec<String>,
    /// Quorum policies by operation kind (`SIGN`, `ROTATE`, ...).
    pub policies: BTreeMap<String, BundledPolicy>,
    /// Versions below this one are refused for verification and decryption.
    pub min_version: u32,
    /// How long a version may protect after activation, milliseconds.
    pub cryptoperiod_ms: Option<i64>,
    /// Whether the key's versions may be backed up again.
    pub backup_exportable: bool,
    /// The principal (client-certificate identity) each officer the
    /// policies name was enrolled for at the source, by officer id, every
    /// one of them; empty ([`NOT_ENROLLED`]) for an officer no longer
    /// enrolled there. A restore registers the key only where those ids
    /// are held by the same principals, and none held where the source had
    /// none (threat model D7). A bundle made before it was carried has no
    /// entries at all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub officer_principals: BTreeMap<String, String>,
}

/// One operation kind's M of N.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundledPolicy {
    /// The eligible officers (N), by officer id, sorted.
    pub officers: Vec<String>,
    /// Approvals needed (M).
    pub required: u32,
}

impl BundledPolicy {
    /// The manifest's form of `quorum`.
    pub fn of(quorum: &Quorum) -> BundledPolicy {
        BundledPolicy {
            officers: quorum.members.iter().cloned().collect(),
            required: quorum.required,
        }
    }

    /// The quorum this names, under the rules every quorum keeps
    /// ([`Quorum::new`]).
    pub fn quorum(&self) -> Result<Quorum, String> {
        Quorum::new(self.officers.clone(), self.required)
    }
}

/// Which backup KEK (and so which share set) unwraps the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupKekRef {
    /// The share set id, 8 hex.
    pub set_id: String,
    /// Shares needed (K).
    pub threshold: u8,
    /// Shares made (N).
    pub shares: u8,
    /// The backup KEK's KCV, 6 hex.
    pub kcv: String,
}

/// One wrapped key version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundledKey {
    /// The key id.
    pub key_id: String,
    /// The version, from 1.
    pub version: u32,
    /// The API algorithm name.
    pub algorithm: String,
    /// The version's lifecycle state at backup time, as the registry names
    /// it (`active`, `pre_activation`, ...).
    pub state: String,
    /// Hex SHA-256 of the SPKI DER (key pairs) or the 3-byte KCV (AES).
    pub fingerprint: String,
    /// Hex SPKI DER (key pairs only).
    pub public_key_der: Option<String>,
    /// The restore check (AES keys only).
    pub check: Option<AesCheck>,
    /// The RFC 5649 wrapped key, hex.
    pub wrapped: String,
    /// Unix milliseconds of the version's last state change at the source.
    pub state_ms: i64,
    /// Unix milliseconds when the version first became active (its
    /// cryptoperiod runs from here), if it ever did.
    pub activated_ms: Option<i64>,
    /// Unix milliseconds of a scheduled destruction, if one is scheduled.
    pub destroy_at_ms: Option<i64>,
    /// The reason of a legal hold on the version, if one is in place.
    pub legal_hold: Option<String>,
    /// The quorum a scheduled destruction was approved under: the restored
    /// schedule stands as long as DESTROY_VERSION still needs that quorum,
    /// as it did at the source. A bundle made before it was carried has
    /// none, and its schedules are dropped when due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy_approved_under: Option<BundledPolicy>,
}

/// An AES-GCM encryption of [`CHECK_PLAINTEXT`] made with the key at backup
/// time: decrypting it after unwrapping proves the key is the one backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AesCheck {
    /// The 12-byte IV, hex.
    pub iv: String,
    /// Ciphertext and 16-byte tag, hex.
    pub ciphertext: String,
}

/// The exact bytes the audit key signs for `manifest`:
/// `"custody-backup-manifest/v1\n"` ‖ SHA-256(canonical JSON of the manifest).
pub fn manifest_message(manifest: &Manifest) -> Vec<u8> {
    // Serializing strings, integers, options and vectors to memory cannot fail.
    let json = serde_json::to_vec(manifest).unwrap_or_default();
    let mut message = MANIFEST_DOMAIN.to_vec();
    message.extend_from_slice(&Sha256::digest(&json));
    message
}

/// Lower-case hex only ([`lower_hex`]), `len` bytes if given; returns the
/// bytes.
fn hex_field(field: &str, value: &str, len: Option<usize>) -> Result<Vec<u8>, BundleError> {
    let bytes = lower_hex(value)
        .ok_or_else(|| invalid(field, "must be lower-case hex (an even number of 0-9, a-f)"))?;
    match len {
        Some(len) if bytes.len() != len => Err(invalid(
            field,
            format!(
                "must be {len} bytes ({} hex digits), not {}",
                len * 2,
                bytes.len()
            ),
        )),
        _ => Ok(bytes),
    }
}

fn spki_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

impl Bundle {
    /// An unsigned bundle for `manifest`; sign [`Bundle::signing_message`]
    /// and store it with [`Bundle::set_signature`].
    pub fn new(manifest: Manifest, audit_key_pem: &str) -> Bundle {
        Bundle {
            manifest,
            signature: String::new(),
            audit_key_pem: audit_key_pem.into(),
        }
    }

    /// The exact bytes the audit key signs: [`manifest_message`].
    pub fn signing_message(&self) -> Vec<u8> {
        manifest_message(&self.manifest)
    }

    /// Stores the audit key's DER signature over [`Bundle::signing_message`].
    /// Refuses anything that is not a DER ECDSA P-256 signature (a raw
    /// r ‖ s from the HSM must be converted first).
    pub fn set_signature(&mut self, der: &[u8]) -> Result<(), BundleError> {
        p256::ecdsa::Signature::from_der(der).map_err(|e| {
            BundleError::Signature(format!("is not a DER ECDSA P-256 signature: {e}"))
        })?;
        self.signature = hex::encode(der);
        Ok(())
    }

    /// Reads a bundle file and checks its structure ([`Bundle::validate`]).
    /// Does not check the signature: call [`Bundle::verify`].
    pub fn parse(text: &str) -> Result<Bundle, BundleError> {
        let bundle: Bundle =
            serde_json::from_str(text).map_err(|e| BundleError::Json(e.to_string()))?;
        bundle.validate()?;
        Ok(bundle)
    }

    /// The structural rules of the format (the engine checks a bundle it
    /// made with this before writing it). The first broken rule is the error.
    pub fn validate(&self) -> Result<(), BundleError> {
        let m = &self.manifest;
        if OLDER_FORMATS.contains(&m.format.as_str()) {
            return Err(invalid(
                "manifest.format",
                format!(
                    "{:?} is an older format that does not carry the keys' policies, minimum \
                     versions, cryptoperiods or legal holds, so a restore could not reproduce \
                     them: make a new backup ({FORMAT:?}) at the source",
                    m.format
                ),
            ));
        }
        if m.format != FORMAT {
            return Err(invalid(
                "manifest.format",
                format!("{:?} is not {FORMAT:?}", m.format),
            ));
        }
        time::OffsetDateTime::parse(&m.created, &time::format_description::well_known::Rfc3339)
            .map_err(|e| {
                invalid(
                    "manifest.created",
                    format!("{:?} is not an RFC 3339 time: {e}", m.created),
                )
            })?;
        if m.source_token.trim().is_empty() {
            return Err(invalid(
                "manifest.source_token",
                "is empty: it names the token the keys came from",
            ));
        }
        let kek = &m.backup_kek;
        hex_field("manifest.backup_kek.set_id", &kek.set_id, Some(SET_ID_LEN))?;
        if kek.threshold < 2 || kek.threshold > kek.shares || kek.shares > MAX_SHARES {
            return Err(invalid(
                "manifest.backup_kek.threshold",
                format!(
                    "{} of {} shares: need 2 <= threshold <= shares <= {MAX_SHARES}",
                    kek.threshold, kek.shares
                ),
            ));
        }
        hex_field("manifest.backup_kek.kcv", &kek.kcv, Some(KCV_LEN))?;
        if m.keys.is_empty() {
            return Err(invalid("manifest.keys", "the bundle holds no keys"));
        }
        let mut seen = BTreeSet::new();
        for (i, key) in m.keys.iter().enumerate() {
            let at = format!("manifest.keys[{i}]");
            validate_key(&at, key)?;
            if !seen.insert((key.key_id.as_str(), key.version)) {
                return Err(invalid(
                    at,
                    format!(
                        "{} version {} appears twice in the bundle",
                        key.key_id, key.version
                    ),
                ));
            }
        }
        validate_protections(m)?;
        if self.signature.is_empty() {
            return Err(invalid("signature", "the bundle is not signed"));
        }
        hex_field("signature", &self.signature, None)?;
        self.audit_key_spki()?;
        Ok(())
    }

    /// The SPKI DER of the audit key the bundle names (`audit_key_pem`),
    /// which must be an EC P-256 key.
    pub fn audit_key_spki(&self) -> Result<Vec<u8>, BundleError> {
        let not_p256 = |e: String| {
            invalid(
                "audit_key_pem",
                format!("not an EC P-256 public key PEM: {e}"),
            )
        };
        let der = pem_to_der(&self.audit_key_pem).map_err(not_p256)?;
        VerifyingKey::from_public_key_der(&der).map_err(|e| not_p256(e.to_string()))?;
        Ok(der)
    }

    /// Checks the manifest signature with the audit key the caller trusts
    /// (its SubjectPublicKeyInfo DER), and that the bundle's
    /// `audit_key_pem` is that key. Structure is [`Bundle::parse`]'s job.
    pub fn verify(&self, audit_key_spki: &[u8]) -> Result<(), BundleError> {
        let key = VerifyingKey::from_public_key_der(audit_key_spki)
            .map_err(|e| BundleError::AuditKey(e.to_string()))?;
        let embedded = self.audit_key_spki()?;
        let embedded_key = VerifyingKey::from_public_key_der(&embedded)
            .map_err(|e| invalid("audit_key_pem", e.to_string()))?;
        if embedded_key != key {
            return Err(BundleError::AuditKeyMismatch {
                embedded: spki_sha256(&embedded),
                given: spki_sha256(audit_key_spki),
            });
        }
        if self.signature.is_empty() {
            return Err(BundleError::Signature(
                "is missing: the bundle is not signed".into(),
            ));
        }
        let der = hex::decode(&self.signature)
            .map_err(|_| BundleError::Signature("is not hex".into()))?;
        let signature = p256::ecdsa::Signature::from_der(&der).map_err(|e| {
            BundleError::Signature(format!("is not a DER ECDSA P-256 signature: {e}"))
        })?;
        key.verify(&self.signing_message(), &signature)
            .map_err(|_| {
                BundleError::Signature(
                    "does not verify with the audit key: the manifest was changed after it was signed"
                        .into(),
                )
            })
    }

    /// The bundle as pretty JSON (the file that is written).
    pub fn to_json(&self) -> String {
        // Strings, integers, options and vectors always serialize.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The rules for one key; `at` is its JSON path.
fn validate_key(at: &str, key: &BundledKey) -> Result<(), BundleError> {
    crate::names::check_key_id(&key.key_id)
        .map_err(|e| invalid(format!("{at}.key_id"), e.message))?;
    if key.version < 1 {
        return Err(invalid(
            format!("{at}.version"),
            "versions are numbered from 1",
        ));
    }
    let algorithm = KeyAlgorithm::from_api_name(&key.algorithm).ok_or_else(|| {
        invalid(
            format!("{at}.algorithm"),
            format!("{:?} is not an API algorithm name", key.algorithm),
        )
    })?;
    let state: crate::registry::VersionState =
        serde_json::from_value(serde_json::Value::String(key.state.clone())).map_err(|_| {
            invalid(
                format!("{at}.state"),
                format!(
                    "{:?} is not a lifecycle state (pre_activation, active, suspended, \
                     deactivated, compromised)",
                    key.state
                ),
            )
        })?;
    if state == crate::registry::VersionState::Destroyed {
        return Err(invalid(
            format!("{at}.state"),
            "a destroyed version has no key to back up",
        ));
    }
    // Keys that do not sign are the AES keys: symmetric, no public key.
    if algorithm.sign_algorithm().is_none() {
        validate_aes(at, key)?;
    } else {
        validate_key_pair(at, key)?;
    }
    if let Some(reason) = &key.legal_hold {
        if reason.trim().is_empty() {
            return Err(invalid(
                format!("{at}.legal_hold"),
                "is empty: a legal hold has a reason",
            ));
        }
    }
    if let Some(policy) = &key.destroy_approved_under {
        let field = format!("{at}.destroy_approved_under");
        if key.destroy_at_ms.is_none() {
            return Err(invalid(
                field,
                "is given for a version not scheduled for destruction",
            ));
        }
        policy.quorum().map_err(|e| invalid(field, e))?;
    }
    let wrapped = hex_field(&format!("{at}.wrapped"), &key.wrapped, None)?;
    if wrapped.len() < 2 * WRAP_BLOCK || wrapped.len() % WRAP_BLOCK != 0 {
        return Err(invalid(
            format!("{at}.wrapped"),
            format!(
                "{} bytes is not an RFC 5649 wrapped key (a multiple of {WRAP_BLOCK} bytes, at least {})",
                wrapped.len(),
                2 * WRAP_BLOCK
            ),
        ));
    }
    Ok(())
}

/// Exactly one protections entry per key id of `keys`, each within the
/// rules the service applies to a key's record.
fn validate_protections(m: &Manifest) -> Result<(), BundleError> {
    let key_ids: BTreeSet<&str> = m.keys.iter().map(|k| k.key_id.as_str()).collect();
    let mut seen = BTreeSet::new();
    for (i, p) in m.protections.iter().enumerate() {
        let at = format!("manifest.protections[{i}]");
        if !key_ids.contains(p.key_id.as_str()) {
            return Err(invalid(
                format!("{at}.key_id"),
                format!("{} has no versions in the bundle", p.key_id),
            ));
        }
        if !seen.insert(p.key_id.as_str()) {
            return Err(invalid(
                format!("{at}.key_id"),
                format!("{} has two protections entries", p.key_id),
            ));
        }
        if p.primary_version < 1 {
            return Err(invalid(
                format!("{at}.primary_version"),
                "versions are numbered from 1",
            ));
        }
        validate_signers(&at, &p.allowed_signers)?;
        if let Some(period) = p.cryptoperiod_ms {
            if period <= 0 {
                return Err(invalid(
                    format!("{at}.cryptoperiod_ms"),
                    format!("{period} is not a positive duration"),
                ));
            }
        }
        for (kind, policy) in &p.policies {
            let field = format!("{at}.policies.{kind}");
            if !crate::dual_control::operation::KEY_POLICY_KINDS.contains(&kind.as_str()) {
                return Err(invalid(
                    field,
                    "is not an operation kind a key policy covers",
                ));
            }
            if let Some(bad) = policy
                .officers
                .iter()
                .find(|o| !crate::identity::valid_principal_name(o))
            {
                return Err(invalid(field, format!("{bad:?} is not an officer id")));
            }
            policy.quorum().map_err(|e| invalid(field, e))?;
        }
        // Carried (a bundle from before has none): for every officer the
        // policies name, and none other, so that a restore can tell an
        // officer who had left the source from one never recorded.
        if !p.officer_principals.is_empty() {
            let named: BTreeSet<&str> = p
                .policies
                .values()
                .flat_map(|policy| policy.officers.iter().map(String::as_str))
                .collect();
            let recorded: BTreeSet<&str> =
                p.officer_principals.keys().map(String::as_str).collect();
            if named != recorded {
                return Err(invalid(
                    format!("{at}.officer_principals"),
                    "names other officers than the policies do",
                ));
            }
        }
    }
    if let Some(missing) = key_ids.iter().find(|id| !seen.contains(*id)) {
        return Err(invalid(
            "manifest.protections",
            format!("{missing} has versions in the bundle and no protections entry"),
        ));
    }
    Ok(())
}

/// The same rules the service applies when a key is created.
fn validate_signers(at: &str, signers: &[String]) -> Result<(), BundleError> {
    let field = format!("{at}.allowed_signers");
    if signers.len() > MAX_SIGNERS {
        return Err(invalid(
            field,
            format!("{} signers; at most {MAX_SIGNERS}", signers.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for signer in signers {
        if !crate::identity::valid_principal_name(signer) {
            return Err(invalid(
                field,
                format!("{signer:?} is not a principal name"),
            ));
        }
        if !seen.insert(signer.as_str()) {
            return Err(invalid(field, format!("{signer:?} is listed twice")));
        }
    }
    Ok(())
}

/// AES keys: a KCV fingerprint and the check ciphertext, no public key.
fn validate_aes(at: &str, key: &BundledKey) -> Result<(), BundleError> {
    hex_field(
        &format!("{at}.fingerprint"),
        &key.fingerprint,
        Some(KCV_LEN),
    )
    .map_err(|_| {
        invalid(
            format!("{at}.fingerprint"),
            "an AES key's fingerprint is its KCV: 6 lower-case hex digits",
        )
    })?;
    if key.public_key_der.is_some() {
        return Err(invalid(
            format!("{at}.public_key_der"),
            "an AES key has no public key",
        ));
    }
    let check = key.check.as_ref().ok_or_else(|| {
        invalid(
            format!("{at}.check"),
            "missing: an AES key needs the check ciphertext to prove the restored key",
        )
    })?;
    hex_field(&format!("{at}.check.iv"), &check.iv, Some(GCM_IV_LEN))?;
    hex_field(
        &format!("{at}.check.ciphertext"),
        &check.ciphertext,
        Some(CHECK_PLAINTEXT.len() + GCM_TAG_LEN),
    )?;
    Ok(())
}

/// Key pairs: the public key, whose SHA-256 is the fingerprint.
fn validate_key_pair(at: &str, key: &BundledKey) -> Result<(), BundleError> {
    if key.check.is_some() {
        return Err(invalid(
            format!("{at}.check"),
            "only AES keys carry a check ciphertext",
        ));
    }
    let fingerprint = hex_field(&format!("{at}.fingerprint"), &key.fingerprint, Some(32))?;
    let der = key.public_key_der.as_deref().ok_or_else(|| {
        invalid(
            format!("{at}.public_key_der"),
            "missing: a key pair needs its public key",
        )
    })?;
    let der = hex_field(&format!("{at}.public_key_der"), der, None)?;
    if Sha256::digest(&der).as_slice() != fingerprint.as_slice() {
        return Err(invalid(
            format!("{at}.fingerprint"),
            format!(
                "is not the SHA-256 of public_key_der ({})",
                spki_sha256(&der)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;
    use p256::pkcs8::spki::der::pem::LineEnding;

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_slice(&[byte; 32]).unwrap()
    }

    fn spki(key: &SigningKey) -> Vec<u8> {
        key.verifying_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    fn pem(key: &SigningKey) -> String {
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    fn sign(bundle: &mut Bundle, key: &SigningKey) {
        let signature: p256::ecdsa::Signature = key.sign(&bundle.signing_message());
        bundle.set_signature(signature.to_der().as_bytes()).unwrap();
    }

    fn manifest() -> Manifest {
        let public = spki(&key(3));
        Manifest {
            format: FORMAT.into(),
            created: "2026-05-28T20:26:40.123Z".into(),
            source_token: "custody (serial 1a2b3c4d5e6f7081)".into(),
            backup_kek: BackupKekRef {
                set_id: "3f9a0c21".into(),
                threshold: 2,
                shares: 3,
                kcv: "0c1d2e".into(),
            },
            keys: vec![
                BundledKey {
                    key_id: "root-ca".into(),
                    version: 1,
                    algorithm: "EC_SIGN_P256_SHA256".into(),
                    state: "active".into(),
                    fingerprint: spki_sha256(&public),
                    public_key_der: Some(hex::encode(&public)),
                    check: None,
                    wrapped: "5a".repeat(144),
                    state_ms: 1_780_000_000_000,
                    activated_ms: Some(1_780_000_000_000),
                    destroy_at_ms: None,
                    legal_hold: None,
                    destroy_approved_under: None,
                },
                BundledKey {
                    key_id: "payments-kek".into(),
                    version: 2,
                    algorithm: "AES_256_GCM".into(),
                    state: "deactivated".into(),
                    fingerprint: "a1b2c3".into(),
                    public_key_der: None,
                    check: Some(AesCheck {
                        iv: "01".repeat(12),
                        ciphertext: "c7".repeat(40),
                    }),
                    wrapped: "e4".repeat(40),
                    state_ms: 1_780_000_500_000,
                    activated_ms: Some(1_779_000_000_000),
                    destroy_at_ms: Some(1_790_000_000_000),
                    legal_hold: Some("case 2026-117".into()),
                    destroy_approved_under: None,
                },
            ],
            protections: vec![
                KeyProtections {
                    key_id: "root-ca".into(),
                    primary_version: 1,
                    allowed_signers: vec!["ca-issuer".into(), "ops.backup-1".into()],
                    policies: BTreeMap::from([(
                        "SIGN".to_string(),
                        BundledPolicy {
                            officers: vec!["alice".into(), "bob".into(), "carol".into()],
                            required: 2,
                        },
                    )]),
                    min_version: 0,
                    cryptoperiod_ms: Some(7_776_000_000),
                    backup_exportable: true,
                    officer_principals: BTreeMap::new(),
                },
                KeyProtections {
                    key_id: "payments-kek".into(),
                    primary_version: 2,
                    allowed_signers: Vec::new(),
                    policies: BTreeMap::new(),
                    min_version: 2,
                    cryptoperiod_ms: None,
                    backup_exportable: false,
                    officer_principals: BTreeMap::new(),
                },
            ],
        }
    }

    fn bundle() -> Bundle {
        let mut bundle = Bundle::new(manifest(), &pem(&key(1)));
        sign(&mut bundle, &key(1));
        bundle
    }

    #[test]
    fn a_signed_bundle_round_trips_and_verifies() {
        let bundle = bundle();
        bundle.validate().unwrap();
        let json = bundle.to_json();
        let back = Bundle::parse(&json).unwrap();
        assert_eq!(back, bundle);
        back.verify(&spki(&key(1))).unwrap();
        assert_eq!(back.audit_key_spki().unwrap(), spki(&key(1)));
    }

    #[test]
    fn the_signed_message_is_the_canonical_manifest_json_in_the_design() {
        let m = manifest();
        let k = &m.keys[0];
        let json = format!(
            concat!(
                r#"{{"format":"custody-backup/v2","created":"2026-05-28T20:26:40.123Z","#,
                r#""source_token":"custody (serial 1a2b3c4d5e6f7081)","#,
                r#""backup_kek":{{"set_id":"3f9a0c21","threshold":2,"shares":3,"kcv":"0c1d2e"}},"#,
                r#""keys":[{{"key_id":"root-ca","version":1,"algorithm":"EC_SIGN_P256_SHA256","#,
                r#""state":"active","fingerprint":"{}","public_key_der":"{}","check":null,"wrapped":"{}","#,
                r#""state_ms":1780000000000,"activated_ms":1780000000000,"destroy_at_ms":null,"legal_hold":null}},"#,
                r#"{{"key_id":"payments-kek","version":2,"algorithm":"AES_256_GCM","state":"deactivated","#,
                r#""fingerprint":"a1b2c3","public_key_der":null,"check":{{"iv":"{}","ciphertext":"{}"}},"#,
                r#""wrapped":"{}","state_ms":1780000500000,"activated_ms":1779000000000,"#,
                r#""destroy_at_ms":1790000000000,"legal_hold":"case 2026-117"}}],"#,
                r#""protections":[{{"key_id":"root-ca","primary_version":1,"#,
                r#""allowed_signers":["ca-issuer","ops.backup-1"],"#,
                r#""policies":{{"SIGN":{{"officers":["alice","bob","carol"],"required":2}}}},"#,
                r#""min_version":0,"cryptoperiod_ms":7776000000,"backup_exportable":true}},"#,
                r#"{{"key_id":"payments-kek","primary_version":2,"allowed_signers":[],"policies":{{}},"#,
                r#""min_version":2,"cryptoperiod_ms":null,"backup_exportable":false}}]}}"#
            ),
            k.fingerprint,
            k.public_key_der.as_deref().unwrap(),
            k.wrapped,
            "01".repeat(12),
            "c7".repeat(40),
            "e4".repeat(40),
        );
        let mut expected = b"custody-backup-manifest/v1\n".to_vec();
        expected.extend_from_slice(&Sha256::digest(json.as_bytes()));
        assert_eq!(manifest_message(&m), expected);
        assert_eq!(expected.len(), 27 + 32);
    }

    #[test]
    fn every_structural_rule_is_enforced() {
        type Edit = fn(&mut Bundle);
        let cases: Vec<(&str, Edit)> = vec![
            ("manifest.format", |b| {
                b.manifest.format = "custody-backup/v3".into()
            }),
            ("manifest.format", |b| {
                b.manifest.format = "custody-backup/v1".into()
            }),
            ("manifest.created", |b| {
                b.manifest.created = "28 May 2026".into()
            }),
            ("manifest.source_token", |b| {
                b.manifest.source_token = " ".into()
            }),
            ("manifest.backup_kek.set_id", |b| {
                b.manifest.backup_kek.set_id = "3f9a0c2".into()
            }),
            ("manifest.backup_kek.set_id", |b| {
                b.manifest.backup_kek.set_id = "3F9A0C21".into()
            }),
            ("manifest.backup_kek.threshold", |b| {
                b.manifest.backup_kek.threshold = 1
            }),
            ("manifest.backup_kek.threshold", |b| {
                b.manifest.backup_kek.threshold = 4
            }),
            ("manifest.backup_kek.threshold", |b| {
                b.manifest.backup_kek.threshold = 2;
                b.manifest.backup_kek.shares = 100;
            }),
            ("manifest.backup_kek.kcv", |b| {
                b.manifest.backup_kek.kcv = "0c1d2e3f".into()
            }),
            ("manifest.keys", |b| b.manifest.keys.clear()),
            ("manifest.keys[0].key_id", |b| {
                b.manifest.keys[0].key_id = "Root-CA".into()
            }),
            ("manifest.keys[0].key_id", |b| {
                b.manifest.keys[0].key_id = "1root".into()
            }),
            ("manifest.keys[0].key_id", |b| {
                b.manifest.keys[0].key_id = "r".repeat(64)
            }),
            ("manifest.keys[0].version", |b| {
                b.manifest.keys[0].version = 0
            }),
            ("manifest.keys[1]", |b| {
                let mut copy = b.manifest.keys[0].clone();
                copy.wrapped = "77".repeat(144);
                b.manifest.keys[1] = copy;
            }),
            ("manifest.keys[0].algorithm", |b| {
                b.manifest.keys[0].algorithm = "EC_SIGN_P521_SHA512".into()
            }),
            ("manifest.keys[0].algorithm", |b| {
                b.manifest.keys[0].algorithm = "ec_sign_p256_sha256".into()
            }),
            ("manifest.keys[0].state", |b| {
                b.manifest.keys[0].state = "ENABLED".into()
            }),
            ("manifest.keys[0].state", |b| {
                b.manifest.keys[0].state = "destroyed".into()
            }),
            ("manifest.keys[0].public_key_der", |b| {
                b.manifest.keys[0].public_key_der = None
            }),
            ("manifest.keys[0].public_key_der", |b| {
                b.manifest.keys[0].public_key_der = Some("30zz".into())
            }),
            ("manifest.keys[0].fingerprint", |b| {
                b.manifest.keys[0].fingerprint = "00".repeat(32)
            }),
            ("manifest.keys[0].fingerprint", |b| {
                b.manifest.keys[0].fingerprint = "a1b2c3".into()
            }),
            ("manifest.keys[0].check", |b| {
                b.manifest.keys[0].check = b.manifest.keys[1].check.clone();
            }),
            ("manifest.keys[1].fingerprint", |b| {
                b.manifest.keys[1].fingerprint = b.manifest.keys[0].fingerprint.clone();
            }),
            ("manifest.keys[1].public_key_der", |b| {
                b.manifest.keys[1].public_key_der = b.manifest.keys[0].public_key_der.clone();
            }),
            ("manifest.keys[1].check", |b| {
                b.manifest.keys[1].check = None
            }),
            ("manifest.keys[1].check.iv", |b| {
                if let Some(check) = &mut b.manifest.keys[1].check {
                    check.iv = "01".repeat(16);
                }
            }),
            ("manifest.keys[1].check.ciphertext", |b| {
                if let Some(check) = &mut b.manifest.keys[1].check {
                    check.ciphertext = "c7".repeat(24);
                }
            }),
            ("manifest.keys[1].check.ciphertext", |b| {
                if let Some(check) = &mut b.manifest.keys[1].check {
                    check.ciphertext = "c7 ".repeat(40);
                }
            }),
            ("manifest.keys[1].wrapped", |b| {
                b.manifest.keys[1].wrapped = "e4".repeat(41)
            }),
            ("manifest.keys[1].wrapped", |b| {
                b.manifest.keys[1].wrapped = "e4".repeat(8)
            }),
            ("manifest.keys[1].wrapped", |b| {
                b.manifest.keys[1].wrapped = String::new()
            }),
            ("manifest.keys[1].legal_hold", |b| {
                b.manifest.keys[1].legal_hold = Some(" ".into())
            }),
            ("manifest.keys[0].destroy_approved_under", |b| {
                b.manifest.keys[0].destroy_approved_under = Some(BundledPolicy {
                    officers: vec!["alice".into(), "bob".into()],
                    required: 2,
                })
            }),
            ("manifest.keys[1].destroy_approved_under", |b| {
                b.manifest.keys[1].destroy_approved_under = Some(BundledPolicy {
                    officers: vec!["alice".into()],
                    required: 2,
                })
            }),
            ("manifest.protections[0].allowed_signers", |b| {
                b.manifest.protections[0].allowed_signers.push("Ops".into());
            }),
            ("manifest.protections[0].allowed_signers", |b| {
                b.manifest.protections[0]
                    .allowed_signers
                    .push("ca-issuer".into());
            }),
            ("manifest.protections[1].allowed_signers", |b| {
                b.manifest.protections[1].allowed_signers =
                    (0..257).map(|i| format!("p{i}")).collect();
            }),
            ("manifest.protections[1].key_id", |b| {
                b.manifest.protections[1].key_id = "root-ca".into()
            }),
            ("manifest.protections[1].key_id", |b| {
                b.manifest.protections[1].key_id = "other".into()
            }),
            ("manifest.protections", |b| {
                b.manifest.protections.pop();
            }),
            ("manifest.protections[0].primary_version", |b| {
                b.manifest.protections[0].primary_version = 0
            }),
            ("manifest.protections[0].cryptoperiod_ms", |b| {
                b.manifest.protections[0].cryptoperiod_ms = Some(0)
            }),
            ("manifest.protections[0].officer_principals", |b| {
                // Recorded for one officer of three: a departed officer
                // would not be told from one never recorded.
                b.manifest.protections[0]
                    .officer_principals
                    .insert("alice".into(), "alice".into());
            }),
            ("manifest.protections[0].policies.SIGN", |b| {
                if let Some(p) = b.manifest.protections[0].policies.get_mut("SIGN") {
                    p.required = 1;
                }
            }),
            ("manifest.protections[0].policies.SIGN", |b| {
                if let Some(p) = b.manifest.protections[0].policies.get_mut("SIGN") {
                    p.required = 4;
                }
            }),
            ("manifest.protections[0].policies.SIGN", |b| {
                if let Some(p) = b.manifest.protections[0].policies.get_mut("SIGN") {
                    p.officers.push("alice".into());
                }
            }),
            ("manifest.protections[0].policies.SIGN", |b| {
                if let Some(p) = b.manifest.protections[0].policies.get_mut("SIGN") {
                    p.officers.push("Mallory".into());
                }
            }),
            ("manifest.protections[0].policies.LAUNCH", |b| {
                let p = b.manifest.protections[0].policies["SIGN"].clone();
                b.manifest.protections[0]
                    .policies
                    .insert("LAUNCH".into(), p);
            }),
            ("signature", |b| b.signature = String::new()),
            ("signature", |b| b.signature = "3045xx".into()),
            ("audit_key_pem", |b| {
                b.audit_key_pem = "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n".into()
            }),
        ];
        for (field, edit) in cases {
            let mut b = bundle();
            edit(&mut b);
            let err = Bundle::parse(&b.to_json()).unwrap_err();
            match &err {
                BundleError::Invalid { field: f, .. } => assert_eq!(f, field, "{err}"),
                other => panic!("{field}: {other}"),
            }
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
    }

    #[test]
    fn text_that_is_not_exactly_the_format_is_refused() {
        let json = bundle().to_json();
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["manifest"]["keys"][0]["comment"] = "not covered by the format".into();
        assert!(matches!(
            Bundle::parse(&value.to_string()),
            Err(BundleError::Json(_))
        ));
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["manifest"]
            .as_object_mut()
            .unwrap()
            .remove("backup_kek");
        assert!(matches!(
            Bundle::parse(&value.to_string()),
            Err(BundleError::Json(_))
        ));
        assert!(matches!(Bundle::parse("[]"), Err(BundleError::Json(_))));
        assert!(matches!(Bundle::parse(""), Err(BundleError::Json(_))));
    }

    #[test]
    fn a_changed_manifest_fails_the_signature() {
        let json = bundle().to_json();
        let given = spki(&key(1));
        // One character of each kind of field, in the file as stored.
        let edits = [
            ("\"version\": 2", "\"version\": 3"),
            ("\"state\": \"deactivated\"", "\"state\": \"active\""),
            ("\"threshold\": 2", "\"threshold\": 3"),
            ("\"kcv\": \"0c1d2e\"", "\"kcv\": \"0c1d2f\""),
            ("20:26:40.123Z", "20:26:41.123Z"),
            ("\"e4e4", "\"e5e4"),
        ];
        for (from, to) in edits {
            assert!(json.contains(from), "{from}");
            let changed = Bundle::parse(&json.replacen(from, to, 1)).unwrap();
            let err = changed.verify(&given).unwrap_err();
            assert!(matches!(err, BundleError::Signature(_)), "{from}: {err}");
            assert!(err.to_string().contains("changed"), "{err}");
        }
        let mut reordered = Bundle::parse(&json).unwrap();
        reordered.manifest.keys.reverse();
        assert!(matches!(
            reordered.verify(&given),
            Err(BundleError::Signature(_))
        ));
    }

    #[test]
    fn altered_protections_fail_the_signature() {
        let given = spki(&key(1));
        type Edit = fn(&mut Manifest);
        let edits: Vec<(&str, Edit)> = vec![
            ("policy removed", |m| m.protections[0].policies.clear()),
            ("quorum weakened", |m| {
                if let Some(p) = m.protections[0].policies.get_mut("SIGN") {
                    p.officers.push("mallory".into());
                }
            }),
            ("minimum version lowered", |m| {
                m.protections[1].min_version = 1
            }),
            ("cryptoperiod dropped", |m| {
                m.protections[0].cryptoperiod_ms = None
            }),
            ("signer added", |m| {
                m.protections[0].allowed_signers.push("mallory".into())
            }),
            ("made exportable", |m| {
                m.protections[1].backup_exportable = true
            }),
            ("primary changed", |m| m.protections[1].primary_version = 1),
            ("legal hold lifted", |m| m.keys[1].legal_hold = None),
            ("destruction's quorum changed", |m| {
                m.keys[1].destroy_approved_under = Some(BundledPolicy {
                    officers: vec!["alice".into(), "bob".into()],
                    required: 2,
                })
            }),
            ("destruction moved", |m| {
                m.keys[1].destroy_at_ms = Some(1_780_000_000_001)
            }),
            ("activation moved", |m| {
                m.keys[0].activated_ms = Some(1_790_000_000_000)
            }),
            ("state time moved", |m| m.keys[0].state_ms += 1),
        ];
        for (what, edit) in edits {
            let mut changed = bundle();
            edit(&mut changed.manifest);
            // Still a well-formed bundle: only the signature catches it.
            let changed = Bundle::parse(&changed.to_json()).unwrap();
            let err = changed.verify(&given).unwrap_err();
            assert!(matches!(err, BundleError::Signature(_)), "{what}: {err}");
        }
        bundle().verify(&given).unwrap();
    }

    #[test]
    fn only_the_trusted_audit_key_verifies() {
        let b = bundle();
        // Signed by the key it names, but that is not the key we trust.
        let mut other = Bundle::new(manifest(), &pem(&key(2)));
        sign(&mut other, &key(2));
        let err = other.verify(&spki(&key(1))).unwrap_err();
        assert_eq!(
            err,
            BundleError::AuditKeyMismatch {
                embedded: spki_sha256(&spki(&key(2))),
                given: spki_sha256(&spki(&key(1))),
            }
        );
        // Names the trusted key, but was signed by another.
        let mut forged = Bundle::new(manifest(), &pem(&key(1)));
        sign(&mut forged, &key(2));
        assert!(matches!(
            forged.verify(&spki(&key(1))),
            Err(BundleError::Signature(_))
        ));
        assert!(matches!(
            b.verify(b"not a key"),
            Err(BundleError::AuditKey(_))
        ));
        let mut unsigned = Bundle::new(manifest(), &pem(&key(1)));
        assert!(matches!(
            unsigned.verify(&spki(&key(1))),
            Err(BundleError::Signature(_))
        ));
        assert!(unsigned.set_signature(b"\x30\x02\x01\x01").is_err());
        assert!(matches!(
            unsigned.validate(),
            Err(BundleError::Invalid { field, .. }) if field == "signature"
        ));
    }
}
