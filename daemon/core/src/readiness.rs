//! Liveness and readiness: what the health service reports for each API
//! service, and the self-test that proves custodyd can still sign.
//!
//! custodyd is *alive* while it answers at all (the health service's empty
//! name). A service is *ready* (SERVING) only when it can do its work now:
//! the audit log records (no record, no operation), the data directory is
//! above its free-space reserve (for services that change state), no HSM call
//! is stuck past its deadline, the HSM pool is not paused for a token
//! security officer step, and the last self-test signed: an ECDSA P-256
//! signature by the self-test key `custody-selftest/v1` (made in the HSM at
//! the first start, non-exportable, used for nothing else) over a fresh
//! random challenge, verified outside the HSM with its public key.

use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use sha2::Digest;

use hsm_shim::{EcdsaEncoding, Exportability, Hsm, KeyLabel, KeySpec, SignAlgorithm, SignInput};

/// `[health]` in the config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// Seconds between signing self-tests (0: only the one at start).
    #[serde(default = "default_self_test_interval_secs")]
    pub self_test_interval_secs: u64,
}

impl Default for HealthSection {
    fn default() -> HealthSection {
        HealthSection {
            self_test_interval_secs: default_self_test_interval_secs(),
        }
    }
}

fn default_self_test_interval_secs() -> u64 {
    30
}

/// The HSM label of the self-test key.
pub const SELF_TEST_KEY_LABEL: &str = "custody-selftest/v1";

/// What the self-test signs: a domain string and a random challenge, so that
/// its signatures can be taken for nothing else.
const SELF_TEST_DOMAIN: &str = "custody-selftest/v1\n";

/// What the readiness of the services depends on, as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    /// The audit log can record.
    pub audit_records: bool,
    /// The data directory is above its free-space reserve.
    pub storage_room: bool,
    /// No HSM call is stuck past its deadline.
    pub hsm_answering: bool,
    /// The HSM pool is not paused for a token security officer step.
    pub hsm_unpaused: bool,
    /// The last self-test signed and verified.
    pub self_test_signed: bool,
}

/// One API service, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Serves from the audit log alone (reads of it are audited too).
    AuditOnly,
    /// Changes state or uses the HSM: needs every condition.
    Everything,
}

impl Conditions {
    /// Whether a service that needs `need` is ready.
    pub fn ready_for(&self, need: Need) -> bool {
        match need {
            Need::AuditOnly => self.audit_records,
            Need::Everything => self.reasons().is_empty(),
        }
    }

    /// Why custodyd is not ready, in words (empty when it is).
    pub fn reasons(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if !self.audit_records {
            reasons.push("the audit log cannot record");
        }
        if !self.storage_room {
            reasons.push("the data directory is below its free-space reserve");
        }
        if !self.hsm_answering {
            reasons.push("an HSM call is stuck past its deadline");
        }
        if !self.hsm_unpaused {
            reasons.push("the HSM is paused for a security officer step");
        }
        if !self.self_test_signed {
            reasons.push("the signing self-test failed");
        }
        reasons
    }

    /// The readiness states as metric labels, each with whether it holds.
    pub fn states(&self) -> [(&'static str, bool); 5] {
        [
            ("audit_records", self.audit_records),
            ("storage_room", self.storage_room),
            ("hsm_answering", self.hsm_answering),
            ("hsm_unpaused", self.hsm_unpaused),
            ("self_test_signed", self.self_test_signed),
        ]
    }
}

fn label() -> Result<KeyLabel, String> {
    KeyLabel::new(SELF_TEST_KEY_LABEL).map_err(|e| e.to_string())
}

/// Makes the self-test key if the token has none; returns its public key
/// (SubjectPublicKeyInfo DER). Run once at start.
pub async fn ensure_key(hsm: &Hsm) -> Result<Vec<u8>, String> {
    let label = label()?;
    hsm.run(move |session| match session.public_key(&label) {
        Ok(key) => Ok(key.spki_der().to_vec()),
        Err(e) if e.kind() == hsm_shim::ErrorKind::NotFound => session
            .generate_key_pair(&label, KeySpec::EcP256, Exportability::NonExportable)
            .and_then(|info| {
                info.public_key
                    .map(|key| key.spki_der().to_vec())
                    .ok_or_else(|| {
                        hsm_shim::HsmError::new(
                            hsm_shim::ErrorKind::Internal,
                            "self-test key without a public key",
                        )
                    })
            }),
        Err(e) => Err(e),
    })
    .await
    .map_err(|e| format!("the self-test key {SELF_TEST_KEY_LABEL}: {e}"))
}

/// Signs a fresh random challenge with the self-test key in the HSM and
/// verifies the signature with `public_key_der` outside it.
pub async fn self_test(hsm: &Hsm, public_key_der: &[u8]) -> Result<(), String> {
    let mut challenge = [0u8; 32];
    getrandom::getrandom(&mut challenge).map_err(|e| format!("random challenge: {e}"))?;
    let message = [
        SELF_TEST_DOMAIN.as_bytes(),
        &hex::encode(challenge).into_bytes(),
    ]
    .concat();
    let digest = sha2::Sha256::digest(&message).to_vec();
    let label = label()?;
    let signature = hsm
        .run(move |session| {
            session.sign(
                &label,
                SignAlgorithm::EcdsaP256Sha256,
                SignInput::Digest(&digest),
                EcdsaEncoding::Der,
            )
        })
        .await
        .map_err(|e| format!("self-test signature: {e}"))?;
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(public_key_der)
        .map_err(|e| format!("self-test key: {e}"))?;
    let signature = p256::ecdsa::Signature::from_der(&signature)
        .map_err(|e| format!("self-test signature: {e}"))?;
    key.verify(&message, &signature)
        .map_err(|_| "the self-test signature does not verify".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(value: bool) -> Conditions {
        Conditions {
            audit_records: value,
            storage_room: value,
            hsm_answering: value,
            hsm_unpaused: value,
            self_test_signed: value,
        }
    }

    #[test]
    fn any_failed_condition_makes_the_signing_services_unready() {
        assert!(all(true).ready_for(Need::Everything));
        assert!(all(true).reasons().is_empty());
        for i in 0..5 {
            let mut conditions = all(true);
            match i {
                0 => conditions.audit_records = false,
                1 => conditions.storage_room = false,
                2 => conditions.hsm_answering = false,
                3 => conditions.hsm_unpaused = false,
                _ => conditions.self_test_signed = false,
            }
            assert!(!conditions.ready_for(Need::Everything), "{conditions:?}");
            assert_eq!(conditions.reasons().len(), 1);
            assert_eq!(conditions.ready_for(Need::AuditOnly), i != 0);
        }
    }
}
