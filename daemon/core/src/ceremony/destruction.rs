//! What a key-destruction ceremony journals: the manifest officers confirm
//! (each version's HSM object, fingerprint and the approved destruction it
//! carries out) and each object's progress through the destroy step.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::dual_control::operation::{OperationRecord, Spec};
use crate::registry::{KeyRecord, VersionRecord};

/// A key-destruction ceremony's manifest and progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destruction {
    /// The key.
    pub key_id: String,
    /// The manifest, JSON, exactly as its SHA-256 was confirmed.
    pub manifest: String,
    /// SHA-256 of `manifest`, hex: what the officers sign.
    pub manifest_sha256: String,
    /// Each version's object, in the manifest's order.
    pub objects: Vec<DestructionObject>,
}

/// One version's HSM object in the destroy step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestructionObject {
    /// The version.
    pub version: u32,
    /// Its `CKA_LABEL` and `CKA_ID`.
    pub hsm_label: String,
    /// Its destruction was journaled as about to happen: from the first
    /// one on, the ceremony only goes forward.
    pub intended: bool,
    /// Its destruction is done (an object already absent counts).
    pub destroyed: bool,
}

impl Destruction {
    /// Whether the first destruction was journaled as about to happen:
    /// from here nothing can be undone, so a stop finishes the ceremony.
    pub fn begun(&self) -> bool {
        self.objects.iter().any(|o| o.intended)
    }

    /// The versions, in the manifest's order.
    pub fn versions(&self) -> Vec<u32> {
        self.objects.iter().map(|o| o.version).collect()
    }
}

/// A version's fingerprint: SHA-256 of its public key (SPKI DER), or an
/// AES key's KCV.
pub fn fingerprint(version: &VersionRecord) -> String {
    match hex::decode(&version.public_key_der_hex) {
        Ok(spki) if !spki.is_empty() => hex::encode(Sha256::digest(spki)),
        _ => format!("kcv:{}", version.check_value),
    }
}

/// The latest approved DESTROY_VERSION of `key_id` version `version`, if
/// the store still has it.
pub fn approval_of<'a>(
    operations: &'a [OperationRecord],
    key_id: &str,
    version: u32,
) -> Option<&'a OperationRecord> {
    operations
        .iter()
        .filter(|op| {
            matches!(&op.spec, Spec::DestroyVersion { key_id: k, version: v } if k == key_id && *v == version)
                && op.outcome.is_some()
        })
        .max_by_key(|op| op.finished_ms.unwrap_or(op.created_ms))
}

/// The manifest of `versions` of `key` (each checked by the caller) and
/// what the destroy step tracks.
pub fn manifest(
    ceremony: &str,
    key: &KeyRecord,
    versions: &[&VersionRecord],
    operations: &[OperationRecord],
) -> Destruction {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| {
            let approval = approval_of(operations, &key.key_id, v.version).map(|op| {
                json!({
                    "operation": op.id,
                    "digest": op.digest,
                    "approved_by": op.ballot.approvals.keys().collect::<Vec<_>>(),
                    "required": op.quorum.required,
                })
            });
            json!({
                "version": v.version,
                "state": format!("{:?}", v.state),
                "hsm_label": v.hsm_label,
                "hsm_id": v.hsm_label,
                "fingerprint": fingerprint(v),
                "destroy_at": crate::audit::rfc3339_ms(v.destroy_at_ms.unwrap_or_default()),
                "approval": approval,
            })
        })
        .collect();
    let manifest = json!({
        "format": "custody-key-destruction/v1",
        "ceremony": ceremony,
        "key": key.key_id,
        "algorithm": key.algorithm,
        "versions": entries,
    })
    .to_string();
    Destruction {
        key_id: key.key_id.clone(),
        manifest_sha256: hex::encode(Sha256::digest(manifest.as_bytes())),
        manifest,
        objects: versions
            .iter()
            .map(|v| DestructionObject {
                version: v.version,
                hsm_label: v.hsm_label.clone(),
                intended: false,
                destroyed: false,
            })
            .collect(),
    }
}
