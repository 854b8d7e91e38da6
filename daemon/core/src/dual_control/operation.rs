//! Operations: what was asked, by whom, until when, under which quorum; the
//! canonical digest officers sign ([`Terms`]); the text they read before
//! signing, made from the same terms, so that a client holding them (as
//! custodyctl does) renders and recomputes both without trusting the
//! server's prose or digest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::quorum::{Ballot, Quorum};

/// One key version a backup holds: what the officers approve, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackedUpVersion {
    /// Key id.
    pub key_id: String,
    /// Version.
    pub version: u32,
}

/// What an operation does, exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Spec {
    /// Sign a digest.
    Sign {
        /// Key id.
        key_id: String,
        /// The version (fixed at request time: officers approve one version).
        version: u32,
        /// Hash name (sha256, sha384, sha512).
        hash: String,
        /// The digest, hex.
        digest: String,
        /// "der" or "raw".
        encoding: String,
    },
    /// Rotate a key.
    Rotate {
        /// Key id.
        key_id: String,
    },
    /// Change a version's state.
    SetState {
        /// Key id.
        key_id: String,
        /// Version.
        version: u32,
        /// New state (API name).
        state: String,
        /// Why (required for COMPROMISED).
        #[serde(default)]
        reason: String,
    },
    /// Set (or, with `required` 0, remove) a key's policy for one operation kind.
    SetPolicy {
        /// Key id.
        key_id: String,
        /// The operation kind the policy governs (API name).
        operation: String,
        /// Eligible officers.
        officers: Vec<String>,
        /// Approvals needed.
        required: u32,
    },
    /// Enroll an officer.
    AddOfficer {
        /// Officer id.
        officer_id: String,
        /// Certificate principal.
        principal: String,
        /// Ed25519 public key, hex.
        public_key: String,
    },
    /// Remove an officer.
    RemoveOfficer {
        /// Officer id.
        officer_id: String,
    },
    /// Schedule a version's destruction after the cancel window.
    DestroyVersion {
        /// Key id.
        key_id: String,
        /// Version.
        version: u32,
    },
    /// Release a version's legal hold.
    ReleaseLegalHold {
        /// Key id.
        key_id: String,
        /// Version.
        version: u32,
    },
    /// Change a key's cryptoperiod or minimum version.
    UpdateKey {
        /// Key id.
        key_id: String,
        /// New cryptoperiod in seconds (0 removes it); `None` leaves it.
        cryptoperiod_secs: Option<i64>,
        /// New minimum version; `None` leaves it.
        min_version: Option<u32>,
    },
    /// Decrypt a ciphertext with a version of an ENCRYPT_DECRYPT key and
    /// release the plaintext sealed to `recipient`.
    Decrypt {
        /// Key id.
        key_id: String,
        /// The version the ciphertext names (fixed at request time).
        version: u32,
        /// The ciphertext, hex.
        ciphertext: String,
        /// Its associated data, hex.
        associated_data: String,
        /// The Ed25519 public key the plaintext is sealed to, hex.
        recipient: String,
    },
    /// Make a backup bundle: exactly these key versions, wrapped under the
    /// backup KEK of this share set (fixed at request time).
    CreateBackup {
        /// The current backup KEK's share set id, hex.
        backup_kek_set_id: String,
        /// The key versions the bundle holds, in registry order.
        versions: Vec<BackedUpVersion>,
    },
    /// Make the backup KEK a KEK ceremony made the token's current one:
    /// every later backup is wrapped under it.
    ActivateBackupKek {
        /// The KEK ceremony that made it.
        ceremony: String,
        /// Its share set id, hex.
        set_id: String,
        /// Its key check value, hex.
        check_value: String,
        /// Shares needed to rebuild it (K).
        threshold: u8,
        /// Shares handed out (N).
        shares: u8,
    },
}

impl Spec {
    /// The API name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::Sign { .. } => "SIGN",
            Spec::Rotate { .. } => "ROTATE",
            Spec::SetState { .. } => "SET_STATE",
            Spec::SetPolicy { .. } => "SET_POLICY",
            Spec::AddOfficer { .. } => "ADD_OFFICER",
            Spec::RemoveOfficer { .. } => "REMOVE_OFFICER",
            Spec::DestroyVersion { .. } => "DESTROY_VERSION",
            Spec::ReleaseLegalHold { .. } => "RELEASE_LEGAL_HOLD",
            Spec::UpdateKey { .. } => "UPDATE_KEY",
            Spec::CreateBackup { .. } => "CREATE_BACKUP",
            Spec::ActivateBackupKek { .. } => "ACTIVATE_BACKUP_KEK",
            Spec::Decrypt { .. } => "DECRYPT",
        }
    }

    /// The key the operation concerns, if any.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Spec::Sign { key_id, .. }
            | Spec::Rotate { key_id }
            | Spec::SetState { key_id, .. }
            | Spec::SetPolicy { key_id, .. }
            | Spec::DestroyVersion { key_id, .. }
            | Spec::ReleaseLegalHold { key_id, .. }
            | Spec::UpdateKey { key_id, .. }
            | Spec::Decrypt { key_id, .. } => Some(key_id),
            Spec::AddOfficer { .. }
            | Spec::RemoveOfficer { .. }
            | Spec::CreateBackup { .. }
            | Spec::ActivateBackupKek { .. } => None,
        }
    }

    /// The free text in the spec, which only a person reads: a SET_STATE's
    /// reason. [`crate::text`] rules what it may hold.
    pub fn free_text(&self) -> Option<&str> {
        match self {
            Spec::SetState { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// One line a person reads. Anything the spec holds that could act on
    /// a terminal instead of showing (a control, bidi or zero-width
    /// character, which the API refuses but an old record or a lying server
    /// could carry) is written out escaped.
    pub fn describe(&self) -> String {
        crate::text::escape(&self.describe_raw()).into_owned()
    }

    fn describe_raw(&self) -> String {
        match self {
            Spec::Sign {
                key_id,
                version,
                hash,
                digest,
                encoding,
            } => format!(
                "SIGN the {hash} digest {digest} with keys/{key_id}/versions/{version} ({encoding} signature)"
            ),
            Spec::Rotate { key_id } => {
                format!("ROTATE keys/{key_id}: generate a new version and make it primary")
            }
            Spec::SetState {
                key_id,
                version,
                state,
                reason,
            } => {
                if reason.is_empty() {
                    format!("SET STATE of keys/{key_id}/versions/{version} to {state}")
                } else {
                    format!(
                        "SET STATE of keys/{key_id}/versions/{version} to {state}, because: {reason}"
                    )
                }
            }
            Spec::SetPolicy {
                key_id,
                operation,
                required: 0,
                ..
            } => {
                format!("REMOVE the {operation} quorum policy of keys/{key_id}")
            }
            Spec::SetPolicy {
                key_id,
                operation,
                officers,
                required,
            } => format!(
                "SET the {operation} policy of keys/{key_id} to {required} of {}: {}",
                officers.len(),
                officers.join(", ")
            ),
            Spec::AddOfficer {
                officer_id,
                principal,
                public_key,
            } => format!(
                "ADD OFFICER {officer_id} (certificate principal {principal}, Ed25519 key {public_key})"
            ),
            Spec::RemoveOfficer { officer_id } => format!("REMOVE OFFICER {officer_id}"),
            Spec::DestroyVersion { key_id, version } => format!(
                "DESTROY keys/{key_id}/versions/{version}: schedule its destruction in the HSM after the cancel window"
            ),
            Spec::ReleaseLegalHold { key_id, version } => format!(
                "RELEASE THE LEGAL HOLD on keys/{key_id}/versions/{version}, so that it may be destroyed"
            ),
            Spec::UpdateKey {
                key_id,
                cryptoperiod_secs,
                min_version,
            } => {
                let mut changes = Vec::new();
                match cryptoperiod_secs {
                    Some(0) => changes.push("remove its cryptoperiod".to_string()),
                    Some(secs) => changes.push(format!("set its cryptoperiod to {secs} s")),
                    None => {}
                }
                if let Some(min) = min_version {
                    changes.push(format!(
                        "refuse versions below {min} for verification, decryption and rewrap"
                    ));
                }
                format!("UPDATE keys/{key_id}: {}", changes.join("; "))
            }
            Spec::Decrypt {
                key_id,
                version,
                ciphertext,
                associated_data,
                recipient,
            } => {
                let bytes = |h: &str| hex::decode(h).unwrap_or_default();
                let (ciphertext, associated_data) = (bytes(ciphertext), bytes(associated_data));
                format!(
                    "DECRYPT a {}-byte ciphertext (SHA-256 {}) with keys/{key_id}/versions/{version}, associated data of {} bytes (SHA-256 {}), and release the plaintext sealed to the Ed25519 key {recipient}",
                    ciphertext.len(),
                    hex::encode(Sha256::digest(&ciphertext)),
                    associated_data.len(),
                    hex::encode(Sha256::digest(&associated_data)),
                )
            }
            Spec::CreateBackup {
                backup_kek_set_id,
                versions,
            } => {
                let names: Vec<String> = versions
                    .iter()
                    .map(|v| crate::names::version_name(&v.key_id, v.version))
                    .collect();
                format!(
                    "CREATE BACKUP of {} key versions under backup KEK set {backup_kek_set_id}: {}",
                    versions.len(),
                    names.join(", ")
                )
            }
            Spec::ActivateBackupKek {
                ceremony,
                set_id,
                check_value,
                threshold,
                shares,
            } => format!(
                "ACTIVATE BACKUP KEK of ceremonies/{ceremony} (share set {set_id}, {threshold} of {shares} shares, check value {check_value}): every later backup is wrapped under it"
            ),
        }
    }
}

/// Where an operation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Waiting for approvals.
    Pending,
    /// Executed.
    Succeeded,
    /// Approved, but execution failed.
    Failed,
    /// Vetoed.
    Denied,
    /// Not approved in time.
    Expired,
}

/// The outcome of an executed operation, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// A signature.
    Signature {
        /// The version that signed.
        version_name: String,
        /// The signature, hex.
        signature: String,
    },
    /// The operation changed a key (rotate, set state, set policy).
    Key {
        /// Key id.
        key_id: String,
    },
    /// The officer set changed.
    Officers,
    /// A plaintext released, sealed to the operation's recipient key.
    Sealed {
        /// The version that decrypted.
        version_name: String,
        /// The sealed plaintext, hex (see `dual_control::sealed`).
        sealed: String,
    },
    /// A backup bundle made.
    Backup {
        /// The bundle, JSON.
        bundle: String,
        /// Key versions in it.
        keys: u32,
    },
    /// The backup KEK the spec names is the token's current one.
    BackupKekActivated,
}

/// An operation, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRecord {
    /// Random id, hex.
    pub id: String,
    /// What it does.
    pub spec: Spec,
    /// The requesting principal.
    pub requester: String,
    /// The requester's officer id, if the requester is an officer.
    pub requester_officer: Option<String>,
    /// Random nonce, hex: no two operations share a digest.
    pub nonce: String,
    /// Unix milliseconds of the request.
    pub created_ms: i64,
    /// Unix milliseconds of expiry.
    pub expires_ms: i64,
    /// The quorum fixed at request time.
    pub quorum: Quorum,
    /// The canonical digest, hex.
    pub digest: String,
    /// Votes.
    pub ballot: Ballot,
    /// State.
    pub state: OperationState,
    /// Result, once succeeded.
    pub outcome: Option<Outcome>,
    /// Error, once failed.
    pub error: Option<String>,
    /// Unix milliseconds of the final state (absent in records made before
    /// it was kept); retention runs from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
}

/// What officers sign: everything that makes the operation what it is. The
/// digest is SHA-256 of its canonical JSON, with a domain; the rendering is
/// made from the same fields. custodyd makes both from the stored record;
/// a client makes both from the fields an `Operation` message carries.
#[derive(Debug, Clone, Copy)]
pub struct Terms<'a> {
    /// Random id, hex.
    pub id: &'a str,
    /// What it does.
    pub spec: &'a Spec,
    /// The requesting principal.
    pub requester: &'a str,
    /// Unix milliseconds of the request.
    pub created_ms: i64,
    /// Unix milliseconds of expiry.
    pub expires_ms: i64,
    /// Random nonce, hex.
    pub nonce: &'a str,
    /// The quorum that must approve.
    pub quorum: &'a Quorum,
}

/// The canonical encoding of [`Terms`].
#[derive(Serialize)]
struct Canonical<'a> {
    domain: &'static str,
    id: &'a str,
    spec: &'a Spec,
    requester: &'a str,
    created_ms: i64,
    expires_ms: i64,
    nonce: &'a str,
    quorum: &'a Quorum,
}

impl Terms<'_> {
    /// The digest officers sign.
    pub fn digest(&self) -> [u8; 32] {
        let canonical = Canonical {
            domain: "custody-operation/v1",
            id: self.id,
            spec: self.spec,
            requester: self.requester,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            nonce: self.nonce,
            quorum: self.quorum,
        };
        // Struct fields serialise in declaration order, sets in sorted order:
        // the same operation always gives the same bytes.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        Sha256::digest(bytes).into()
    }

    /// What an officer reads before signing: the spec in words, who asked
    /// and when, the quorum, the expiry and the digest; every piece a
    /// caller chose escaped ([`crate::text::escape`]).
    pub fn rendering(&self) -> String {
        let time = crate::audit::rfc3339_ms;
        let shown = crate::text::escape;
        let members: Vec<String> = self
            .quorum
            .members
            .iter()
            .map(|m| shown(m).into_owned())
            .collect();
        format!(
            "operation operations/{}\n  {}\n  requested by {} at {}\n  needs {} approvals of: {}\n  expires {}\n  digest to sign: {}\n",
            shown(self.id),
            self.spec.describe(),
            shown(self.requester),
            time(self.created_ms),
            self.quorum.required,
            members.join(", "),
            time(self.expires_ms),
            hex::encode(self.digest())
        )
    }
}

impl OperationRecord {
    /// What the digest covers, and the rendering shows.
    pub fn terms(&self) -> Terms<'_> {
        Terms {
            id: &self.id,
            spec: &self.spec,
            requester: &self.requester,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            nonce: &self.nonce,
            quorum: &self.quorum,
        }
    }

    /// Computes the digest of a new operation (all fields but `digest`,
    /// `ballot`, `state`, `outcome` and `error` set).
    pub fn compute_digest(&self) -> [u8; 32] {
        self.terms().digest()
    }

    /// The digest as bytes.
    pub fn digest_bytes(&self) -> [u8; 32] {
        hex::decode(&self.digest)
            .ok()
            .and_then(|d| d.try_into().ok())
            .unwrap_or([0; 32])
    }

    /// `operations/{id}`.
    pub fn name(&self) -> String {
        format!("operations/{}", self.id)
    }

    /// What an officer reads before signing ([`Terms::rendering`]).
    pub fn rendering(&self) -> String {
        self.terms().rendering()
    }
}

/// The policy kinds a key can carry (each applies to keys of one purpose
/// or both: [`policy_kind_applies`]).
pub const KEY_POLICY_KINDS: [&str; 8] = [
    "SIGN",
    "ROTATE",
    "SET_STATE",
    "SET_POLICY",
    "DESTROY_VERSION",
    "RELEASE_LEGAL_HOLD",
    "UPDATE_KEY",
    "DECRYPT",
];

/// Whether a policy of `kind` means anything on a key of this purpose: a
/// SIGN policy governs signing keys only, a DECRYPT policy ENCRYPT_DECRYPT
/// keys only; the key-management kinds govern both. A policy that could
/// never apply would look like protection and be none, so it is refused.
pub fn policy_kind_applies(kind: &str, purpose: crate::algorithms::Purpose) -> bool {
    use crate::algorithms::Purpose;
    match kind {
        "SIGN" => purpose == Purpose::AsymmetricSign,
        "DECRYPT" => purpose == Purpose::EncryptDecrypt,
        other => KEY_POLICY_KINDS.contains(&other),
    }
}

/// The policy kinds whose operation a key's material alone performs:
/// whoever unwraps the key from a backup signs or decrypts with it outside
/// custody, whatever its policies say (so a backup KEK's share threshold
/// must cover them, threat model I1).
pub const USED_BY_MATERIAL_ALONE: [&str; 2] = ["SIGN", "DECRYPT"];

/// Kinds that always need a quorum: the key's own policy if it has one,
/// otherwise the administrative quorum.
/// CREATE_BACKUP and ACTIVATE_BACKUP_KEK name no key: always the
/// administrative quorum.
pub const ALWAYS_GATED_KINDS: [&str; 5] = [
    "SET_POLICY",
    "DESTROY_VERSION",
    "RELEASE_LEGAL_HOLD",
    "CREATE_BACKUP",
    "ACTIVATE_BACKUP_KEK",
];

/// A key's policies, by operation kind.
pub type KeyPolicies = BTreeMap<String, Quorum>;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(nonce: &str) -> OperationRecord {
        OperationRecord {
            id: "0011".into(),
            spec: Spec::Rotate {
                key_id: "root".into(),
            },
            requester: "ops".into(),
            requester_officer: None,
            nonce: nonce.into(),
            created_ms: 1,
            expires_ms: 2,
            quorum: Quorum::new(["a".to_string(), "b".into()], 2).unwrap(),
            digest: String::new(),
            ballot: Ballot::default(),
            state: OperationState::Pending,
            outcome: None,
            error: None,
            finished_ms: None,
        }
    }

    #[test]
    fn policy_kinds_apply_to_the_purpose_they_govern() {
        use crate::algorithms::Purpose::{AsymmetricSign, EncryptDecrypt};
        assert!(policy_kind_applies("SIGN", AsymmetricSign));
        assert!(!policy_kind_applies("SIGN", EncryptDecrypt));
        assert!(policy_kind_applies("DECRYPT", EncryptDecrypt));
        assert!(!policy_kind_applies("DECRYPT", AsymmetricSign));
        for kind in KEY_POLICY_KINDS {
            if kind != "SIGN" && kind != "DECRYPT" {
                assert!(policy_kind_applies(kind, AsymmetricSign), "{kind}");
                assert!(policy_kind_applies(kind, EncryptDecrypt), "{kind}");
            }
        }
        for kind in ["", "ADD_OFFICER", "CREATE_BACKUP", "sign"] {
            assert!(!policy_kind_applies(kind, AsymmetricSign), "{kind}");
            assert!(!policy_kind_applies(kind, EncryptDecrypt), "{kind}");
        }
    }

    #[test]
    fn what_officers_read_never_holds_raw_control_or_bidi_characters() {
        let mut r = record("aa");
        r.spec = Spec::SetState {
            key_id: "root".into(),
            version: 1,
            state: "COMPROMISED".into(),
            reason: "\r\x1b[2K  SET STATE of keys/test-key/versions/1 to SUSPENDED\u{202e}".into(),
        };
        r.requester = "ops\x1b[8m".into();
        let rendering = r.rendering();
        for c in rendering.chars().filter(|c| *c != '\n') {
            assert!(
                !crate::text::is_hidden(c),
                "U+{:04X} in {rendering:?}",
                c as u32
            );
        }
        assert!(rendering.contains("to COMPROMISED, because: \\u{d}\\u{1b}[2K"));
        assert!(rendering.contains("requested by ops\\u{1b}[8m"));
        assert_eq!(rendering.lines().count(), 6, "{rendering}");
        assert!(r.spec.free_text().is_some_and(|t| t.starts_with('\r')));
    }

    #[test]
    fn the_digest_covers_every_field_that_defines_the_operation() {
        let base = record("aa");
        let d = base.compute_digest();
        assert_eq!(d, record("aa").compute_digest(), "deterministic");
        let mut changed = vec![record("ab")];
        let mut r = record("aa");
        r.id = "0012".into();
        changed.push(r);
        let mut r = record("aa");
        r.spec = Spec::Rotate {
            key_id: "root2".into(),
        };
        changed.push(r);
        let mut r = record("aa");
        r.requester = "ops2".into();
        changed.push(r);
        let mut r = record("aa");
        r.expires_ms = 3;
        changed.push(r);
        let mut r = record("aa");
        r.quorum = Quorum::new(["a".to_string(), "c".into()], 2).unwrap();
        changed.push(r);
        for other in changed {
            assert_ne!(other.compute_digest(), d, "{other:?}");
        }
    }
}
