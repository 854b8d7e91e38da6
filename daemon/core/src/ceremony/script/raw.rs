//! The script file as written: the serde form toml reads it into, before
//! any rule is applied.
//!
//! Every field is optional here so that a missing one gets an error naming
//! it, from `validate`, rather than serde's; numbers are i64 so that a
//! negative or huge value gets the rule's own message. An unknown field or
//! section, or a value of the wrong type, is refused by toml itself
//! (`deny_unknown_fields`), so its error can give the line it is on.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScript {
    pub(super) format: Option<i64>,
    pub(super) id: Option<String>,
    pub(super) kind: Option<String>,
    pub(super) description: Option<String>,
    pub(super) quorum: Option<RawQuorum>,
    pub(super) key: Option<RawKey>,
    pub(super) certificate: Option<RawCertificate>,
    pub(super) kek: Option<RawKek>,
    pub(super) shares: Option<RawShares>,
    pub(super) components: Option<RawComponents>,
    pub(super) restore: Option<RawRestore>,
    pub(super) intermediate: Option<RawIntermediate>,
    pub(super) cross_sign: Option<RawCrossSign>,
    pub(super) profile: Option<RawProfile>,
    pub(super) crl: Option<RawCrl>,
    pub(super) destruction: Option<RawDestruction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuorum {
    pub(super) officers: Option<Vec<String>>,
    pub(super) required: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) name: Option<String>,
    pub(super) algorithm: Option<String>,
    pub(super) backup: Option<bool>,
    pub(super) signers: Option<Vec<String>>,
    /// `[key.policy.SIGN]` and so on: a quorum per operation kind.
    pub(super) policy: Option<BTreeMap<String, RawQuorum>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub(super) country: Option<String>,
    pub(super) common_name: Option<String>,
    pub(super) organization: Option<String>,
    pub(super) validity_days: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKek {
    pub(super) mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShares {
    pub(super) threshold: Option<i64>,
    pub(super) custodians: Option<Vec<String>>,
    pub(super) encrypt_to_officer_keys: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawComponents {
    pub(super) custodians: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestore {
    pub(super) bundle: Option<String>,
    pub(super) bundle_sha256: Option<String>,
    pub(super) audit_key_sha256: Option<String>,
    pub(super) drill: Option<bool>,
    pub(super) custodians: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntermediate {
    pub(super) issuer: Option<String>,
    pub(super) key: Option<String>,
    pub(super) csr_sha256: Option<String>,
    pub(super) stage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrossSign {
    pub(super) issuer: Option<String>,
    pub(super) certificate_sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfile {
    pub(super) path_len: Option<i64>,
    pub(super) key_usage: Option<Vec<String>>,
    pub(super) extended_key_usage: Option<Vec<String>>,
    pub(super) permitted_dns_names: Option<Vec<String>>,
    pub(super) excluded_dns_names: Option<Vec<String>>,
    pub(super) certificate_policies: Option<Vec<String>>,
    pub(super) crl_distribution_points: Option<Vec<String>>,
    pub(super) ocsp: Option<Vec<String>>,
    pub(super) ca_issuers: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrl {
    pub(super) issuer: Option<String>,
    pub(super) next_update_days: Option<i64>,
    pub(super) revoked: Option<Vec<RawRevoked>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRevoked {
    pub(super) serial: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) revoked_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDestruction {
    pub(super) key: Option<String>,
    pub(super) versions: Option<Vec<i64>>,
}
