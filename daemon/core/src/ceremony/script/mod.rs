//! Ceremony scripts: the TOML file officers review before a ceremony, its
//! validation, its digest, and the plan of steps read out from it.
//!
//! A script says what one ceremony will do (make a root key, make a KEK,
//! restore a backup), who must be present, and who holds shares or
//! components. Officers review the file beforehand and sign its digest when
//! they sign in, so the digest is over the exact text they read: no
//! normalisation, no re-serialisation.
//!
//! Everything is checked here, before any HSM is touched: unknown fields,
//! sections that do not belong to the script's kind, and every value against
//! its rule (the examples in `deploy/ceremonies/` comment each field). An
//! error names the field, says what is wrong and what is allowed:
//! `quorum.required: 4 is more than the 3 officers listed`. Free text is one
//! line without control characters, since it is printed to the terminals
//! officers read. A [`Script`] can only be had from
//! [`Script::parse`], so holding one means the text passed every rule and
//! [`Script::digest`] is the digest of that text.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the typed [`Script`], its sections and accessors, and its digest |
//! | `raw.rs` | the file as toml reads it, before any rule |
//! | `validate.rs` | the raw form to a [`Script`]: every rule, and [`ScriptError`] naming its field |
//! | `plan.rs` | the [`Step`]s each kind takes, and the plan and summary officers review |
//! | `fixtures.rs` | one valid script of each kind, for the tests |

mod plan;
mod raw;
mod validate;

pub use plan::Step;
pub use validate::ScriptError;

use std::collections::BTreeSet;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::algorithms::KeyAlgorithm;
use crate::dual_control::operation::{KeyPolicies, USED_BY_MATERIAL_ALONE};
use crate::dual_control::quorum::Quorum;
use hsm_shim::KeySpec;

/// The operation kinds a key made in a ceremony always has a policy for:
/// those its script's `[key.policy]` does not name get the administrative
/// quorum, as it stands when the ceremony opens.
pub const DEFAULT_POLICY_KINDS: [&str; 4] = ["SIGN", "ROTATE", "SET_STATE", "SET_POLICY"];

/// The domain prefix of a script digest.
pub const SCRIPT_DIGEST_DOMAIN: &[u8] = b"custody-ceremony-script/v1\n";

/// A validated ceremony script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    id: String,
    kind: Kind,
    description: String,
    /// `[quorum]`: the officers who may sign in (2 to 16, distinct) and how
    /// many must (2 to their number), under the rule key policies use.
    quorum: Quorum,
    /// The same officers in the order the script lists them: what people
    /// read (the plan, the summary, who is still awaited) keeps the
    /// reviewed order, where the quorum's set is sorted.
    officers: Vec<String>,
    text_digest: [u8; 32],
}

/// What the ceremony does, with the sections its kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A signing key made in the HSM, optionally with a self-signed root
    /// certificate.
    RootKey {
        /// `[key]`
        key: KeySection,
        /// `[certificate]`
        certificate: Option<CertificateSection>,
    },
    /// An AES_256_GCM key-encryption key.
    Kek {
        /// `[key]`
        key: KeySection,
        /// `[kek] mode` and its section.
        mode: KekMode,
    },
    /// Keys restored from a backup bundle.
    Restore {
        /// The bundle, relative to the script file.
        bundle: PathBuf,
        /// The SHA-256 of the bundle file the officers reviewed.
        bundle_sha256: [u8; 32],
        /// The SHA-256 (of the SPKI DER) of the audit key that must have
        /// signed the bundle's manifest: the source's, as it published it.
        /// Without it only custodyd's own audit key, or one pinned in its
        /// config, is trusted.
        audit_key_sha256: Option<[u8; 32]>,
        /// True: into the scratch token, verified, destroyed. False: into
        /// custodyd's own token, keys registered.
        drill: bool,
        /// Officers allowed to submit a share (2 to 99, distinct).
        custodians: Vec<String>,
    },
    /// A custody root key (made by a root-key ceremony, its root
    /// certificate stored with its version) certifies the public key of
    /// another custody key: a subordinate CA certificate.
    Intermediate {
        /// `[intermediate] issuer`: the root key's id.
        issuer: String,
        /// `[intermediate] key`: the id of the custody key certified;
        /// empty when `csr_sha256` names a CSR instead.
        key: String,
        /// `[intermediate] csr_sha256`: instead of a custody key, the
        /// SHA-256 of the PKCS#10 CSR file (PEM or DER, the bytes as
        /// reviewed) whose subject and public key are certified: an issuing
        /// CA whose key lives outside custody. The CSR is sent with the
        /// ceremony start; its requested extensions are ignored, the
        /// profile is the script's.
        csr_sha256: Option<[u8; 32]>,
        /// A `cross-sign` script's `[cross_sign] certificate_sha256`: the
        /// SHA-256 of an existing CA certificate (PEM or DER, the bytes as
        /// reviewed) whose subject and public key the issuer re-issues
        /// under itself (its key outside custody, or under another root).
        /// The certificate is sent with the ceremony start; nothing but its
        /// subject, key and subjectKeyIdentifier is taken from it.
        /// (Boxed: it keeps the variant near the others' size.)
        certificate_sha256: Option<Box<[u8; 32]>>,
        /// `[intermediate] stage`: certify a staged version of `key` (made
        /// by this ceremony in pre-activation, or the one already staged)
        /// while its current version keeps signing; promoted later by
        /// activating it under the ROTATE and SET_STATE policies.
        stage: bool,
        /// `[certificate]`: the subject and the validity. With a CSR only
        /// the validity (the names are empty: the subject is the CSR's).
        certificate: CertificateSection,
        /// `[profile]`: the subordinate CA profile.
        profile: ProfileSection,
    },
    /// A custody root key (its root certificate stored with its version)
    /// signs a certificate revocation list.
    Crl(CrlSection),
    /// A formal, witnessed destruction of versions of a custody key (a
    /// root or a KEK) whose destruction was approved (DESTROY_VERSION) and
    /// scheduled: WebTrust for CAs 4.6.
    KeyDestruction(DestructionSection),
}

/// `[destruction]`: what a key-destruction ceremony destroys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestructionSection {
    /// `key`: the key id.
    pub key: String,
    /// `versions`: the version numbers, ascending, each once (1 to 64);
    /// each must be scheduled for destruction by an approved
    /// DESTROY_VERSION.
    pub versions: Vec<u32>,
}

/// `[crl]`: the CRL a root signs (RFC 5280 section 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSection {
    /// `issuer`: the root key's id.
    pub issuer: String,
    /// nextUpdate, in days after thisUpdate (1 to 365).
    pub next_update_days: u32,
    /// `[[crl.revoked]]`: the revoked certificates, in the script's order,
    /// each serial once.
    pub revoked: Vec<RevokedEntry>,
}

/// One `[[crl.revoked]]`: a revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// The serial number, big-endian, without leading zero octets (1 to
    /// 20 octets).
    pub serial: Vec<u8>,
    /// The reason, by its RFC 5280 name (one of [`CRL_REASONS`]).
    pub reason: String,
    /// When the revocation took effect, Unix seconds.
    pub revoked_at: i64,
}

/// The reason codes a CRL script may give, by their RFC 5280 names, with
/// their CRLReason values: those of a CA's full CRL the Baseline
/// Requirements allow (no certificateHold, removeFromCRL, aACompromise).
pub const CRL_REASONS: [(&str, u8); 7] = [
    ("unspecified", 0),
    ("keyCompromise", 1),
    ("cACompromise", 2),
    ("affiliationChanged", 3),
    ("superseded", 4),
    ("cessationOfOperation", 5),
    ("privilegeWithdrawn", 9),
];

/// The extended key usages a profile may name, by their script names.
pub const EXTENDED_KEY_USAGES: [&str; 5] = [
    "serverAuth",
    "clientAuth",
    "codeSigning",
    "emailProtection",
    "timeStamping",
];

/// `[profile]`: a subordinate CA certificate's profile (Baseline
/// Requirements 7.1.2.2 and RFC 5280).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProfileSection {
    /// basicConstraints pathLenConstraint (`None`: absent, unlimited).
    pub path_len: Option<u8>,
    /// keyUsage beyond keyCertSign and cRLSign: digitalSignature.
    pub digital_signature: bool,
    /// extendedKeyUsage, by script name (empty: absent).
    pub extended_key_usage: Vec<String>,
    /// nameConstraints permitted dNSNames.
    pub permitted_dns_names: Vec<String>,
    /// nameConstraints excluded dNSNames.
    pub excluded_dns_names: Vec<String>,
    /// certificatePolicies, as dotted OIDs.
    pub certificate_policies: Vec<String>,
    /// cRLDistributionPoints, http URIs.
    pub crl_distribution_points: Vec<String>,
    /// authorityInformationAccess id-ad-ocsp, http URIs.
    pub ocsp: Vec<String>,
    /// authorityInformationAccess id-ad-caIssuers, http URIs.
    pub ca_issuers: Vec<String>,
}

impl Kind {
    /// The name in the script and transcripts: `root-key`, `kek`, `restore`.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::RootKey { .. } => "root-key",
            Kind::Kek { .. } => "kek",
            Kind::Restore { .. } => "restore",
            Kind::Intermediate {
                certificate_sha256: Some(_),
                ..
            } => "cross-sign",
            Kind::Intermediate { .. } => "intermediate",
            Kind::Crl(_) => "crl",
            Kind::KeyDestruction(_) => "key-destruction",
        }
    }
}

/// `[key]`: the key a root-key or kek ceremony makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySection {
    /// The key id (as the service's key ids).
    pub name: String,
    /// Its algorithm: a signing one for a root key, AES_256_GCM for a KEK.
    pub algorithm: KeyAlgorithm,
    /// Whether it can be wrapped under the token's backup KEK.
    pub backup: bool,
    /// Principals (client certificate names) allowed to use the key once it
    /// is committed; may be empty (nobody yet).
    pub signers: Vec<String>,
    /// `[key.policy]`: the quorums the script declares, by operation kind
    /// (empty: none declared). Each of [`DEFAULT_POLICY_KINDS`] it does not
    /// name gets the administrative quorum; see [`KeySection::policies`].
    pub policy: KeyPolicies,
}

impl KeySection {
    /// The HSM key spec to generate or import.
    pub fn spec(&self) -> KeySpec {
        self.algorithm.key_spec()
    }

    /// The kinds of [`DEFAULT_POLICY_KINDS`] the script leaves to the
    /// administrative quorum.
    pub fn defaulted_kinds(&self) -> Vec<&'static str> {
        DEFAULT_POLICY_KINDS
            .into_iter()
            .filter(|kind| !self.policy.contains_key(*kind))
            .collect()
    }

    /// The policies the key is registered with: the declared ones, and
    /// `admin` (the administrative quorum when the ceremony opened) on each
    /// kind of [`DEFAULT_POLICY_KINDS`] the script does not name.
    pub fn policies(&self, admin: &Quorum) -> KeyPolicies {
        let mut policies = self.policy.clone();
        for kind in self.defaulted_kinds() {
            policies.insert(kind.to_owned(), admin.clone());
        }
        policies
    }
}

/// `[certificate]`: a self-signed root certificate for a root key, in the
/// CA/Browser Forum profile of a root CA certificate (subject C, O, CN in
/// that order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSection {
    /// Subject and issuer C: an ISO 3166-1 alpha-2 code (two capital
    /// letters).
    pub country: String,
    /// Subject and issuer O (1-64 characters).
    pub organization: String,
    /// Subject and issuer CN (1-64 characters).
    pub common_name: String,
    /// Validity from issuance, in days (1 to 9125).
    pub validity_days: u32,
}

/// How a KEK comes to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekMode {
    /// Generated in the HSM and backed up under a backup KEK split into
    /// shares.
    Generate {
        /// `[shares]`
        shares: SharesSection,
    },
    /// Assembled from components the custodians enter, and imported
    /// non-extractable.
    Components {
        /// One component each (2 to 16, distinct).
        custodians: Vec<String>,
    },
}

/// `[shares]`: the K-of-N split of the backup KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharesSection {
    /// K: shares needed to rebuild the backup KEK (2 to N).
    pub threshold: u8,
    /// One share each, in share index order (N: 2 to 99, distinct).
    pub custodians: Vec<String>,
    /// Whether each share is sealed to its custodian's officer key.
    pub encrypt_to_officer_keys: bool,
}

/// Refuses a KEK script whose new KEK `holders` could rebuild together
/// (any threshold of the custodians of the backup KEK it is wrapped under,
/// or all its component custodians, named by `field`) when they do not
/// cover ([`Quorum::covers`]) the KEK's own DECRYPT policy (threat model
/// I1): fewer of its officers, or people it does not name, could decrypt
/// with it outside custody. Kinds the script leaves to the administrative
/// quorum are checked against M when the ceremony opens
/// ([`Script::check_admin_quorum`]).
fn holders_cover_the_key(
    field: &str,
    custodians: &[String],
    threshold: usize,
    policy: &KeyPolicies,
) -> Result<(), ScriptError> {
    let required = u32::try_from(threshold).unwrap_or(u32::MAX);
    let holders = Quorum::new(custodians.iter().cloned(), required)
        .map_err(|e| validate::invalid(field, e))?;
    let weaker = USED_BY_MATERIAL_ALONE.iter().find_map(|kind| {
        let quorum = policy.get(*kind)?;
        (!holders.covers(quorum)).then_some((kind, quorum))
    });
    match weaker {
        Some((kind, quorum)) => Err(validate::invalid(
            field,
            format!(
                "any {} of them together rebuild the new KEK, but key.policy.{kind} needs {}: every such set must include as many of its officers",
                holders.text(),
                quorum.text()
            ),
        )),
        None => Ok(()),
    }
}

/// SHA-256(`custody-ceremony-script/v1\n` ‖ the exact script bytes).
pub fn script_digest(text: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(SCRIPT_DIGEST_DOMAIN)
        .chain_update(text)
        .finalize()
        .into()
}

impl Script {
    /// The ceremony id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What it does.
    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// The description, one line.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Who must be present: the officers who may sign in, and how many
    /// must.
    pub fn quorum(&self) -> &Quorum {
        &self.quorum
    }

    /// The largest administrative M this script may run under (I1): its
    /// in-room `[quorum] required` and, for a KEK generated with a backup
    /// KEK split into shares, `[shares] threshold`, whichever is smaller.
    /// Fewer officers than the administrative quorum must not be able to
    /// run the ceremony, nor to rebuild the key a backup is wrapped under.
    pub fn admin_quorum_at_most(&self) -> u32 {
        match &self.kind {
            Kind::Kek {
                mode: KekMode::Generate { shares },
                ..
            } => self.quorum.required.min(u32::from(shares.threshold)),
            _ => self.quorum.required,
        }
    }

    /// Refuses the script when its quorum or share threshold is below
    /// `admin_required`, the administrative M (I1); the message names both
    /// numbers.
    pub fn check_admin_quorum(&self, admin_required: u32) -> Result<(), String> {
        if self.quorum.required < admin_required {
            return Err(format!(
                "quorum.required: {} officers is fewer than the administrative quorum, which needs {admin_required}: a ceremony needs at least as many",
                self.quorum.required
            ));
        }
        match &self.kind {
            Kind::Kek {
                mode: KekMode::Generate { shares },
                ..
            } if u32::from(shares.threshold) < admin_required => Err(format!(
                "shares.threshold: {} shares rebuild the backup KEK, fewer than the administrative quorum, which needs {admin_required}: the threshold must be at least as many",
                shares.threshold
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a KEK script whose new KEK could be rebuilt outside custody
    /// by people who do not cover its own DECRYPT policy (threat model I1;
    /// see [`holders_cover_the_key`]); asked by `ceremony check` and when
    /// the ceremony opens, not when a journaled script is read back, so a
    /// ceremony opened before this rule still finishes.
    pub fn check_holders(&self) -> Result<(), ScriptError> {
        match &self.kind {
            Kind::Kek {
                key,
                mode: KekMode::Generate { shares },
            } => holders_cover_the_key(
                "shares.threshold",
                &shares.custodians,
                usize::from(shares.threshold),
                &key.policy,
            ),
            Kind::Kek {
                key,
                mode: KekMode::Components { custodians },
            } => holders_cover_the_key(
                "components.custodians",
                custodians,
                custodians.len(),
                &key.policy,
            ),
            _ => Ok(()),
        }
    }

    /// The quorum's officers, in the order the script lists them.
    pub fn officers(&self) -> &[String] {
        &self.officers
    }

    /// The kind's name: `root-key`, `kek`, `restore`, `intermediate` or
    /// `crl`.
    pub fn kind_name(&self) -> &'static str {
        self.kind.name()
    }

    /// `[key]`, for root-key and kek scripts.
    pub fn key(&self) -> Option<&KeySection> {
        match &self.kind {
            Kind::RootKey { key, .. } | Kind::Kek { key, .. } => Some(key),
            Kind::Restore { .. }
            | Kind::Intermediate { .. }
            | Kind::Crl(_)
            | Kind::KeyDestruction(_) => None,
        }
    }

    /// The id of the key the ceremony makes, for root-key and kek scripts.
    pub fn key_id(&self) -> Option<&str> {
        self.key().map(|key| key.name.as_str())
    }

    /// Who holds or enters key material: share custodians (kek generate),
    /// component custodians (kek components), or the officers allowed to
    /// submit a share (restore). Empty for a root key.
    pub fn custodians(&self) -> &[String] {
        match &self.kind {
            Kind::Kek {
                mode: KekMode::Generate { shares },
                ..
            } => &shares.custodians,
            Kind::Kek {
                mode: KekMode::Components { custodians },
                ..
            }
            | Kind::Restore { custodians, .. } => custodians,
            Kind::RootKey { .. }
            | Kind::Intermediate { .. }
            | Kind::Crl(_)
            | Kind::KeyDestruction(_) => &[],
        }
    }

    /// Every officer the script names, quorum first, each once: all must be
    /// enrolled before the ceremony opens.
    pub fn participants(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.officers
            .iter()
            .chain(self.custodians())
            .map(String::as_str)
            .filter(|id| seen.insert(*id))
            .collect()
    }

    /// Whether each share is sealed to its custodian's officer key
    /// (`shares.encrypt_to_officer_keys`); false where there are no shares.
    pub fn seal_shares(&self) -> bool {
        matches!(
            &self.kind,
            Kind::Kek {
                mode: KekMode::Generate { shares },
                ..
            } if shares.encrypt_to_officer_keys
        )
    }

    /// SHA-256(`custody-ceremony-script/v1\n` ‖ the exact script text): what
    /// officers sign when they sign in.
    pub fn digest(&self) -> [u8; 32] {
        self.text_digest
    }
}

#[cfg(test)]
mod fixtures;

/// The reviewed `deploy/ceremonies/crl.toml`, for other modules' tests.
#[cfg(test)]
pub(crate) const CRL_EXAMPLE: &str = fixtures::CRL;

/// The reviewed `deploy/ceremonies/intermediate.toml`, for other modules'
/// tests.
#[cfg(test)]
pub(crate) const INTERMEDIATE_EXAMPLE: &str = fixtures::INTERMEDIATE;

#[cfg(test)]
mod tests {
    use super::fixtures::{KEK_COMPONENTS, KEK_GENERATE, RESTORE, ROOT_KEY};
    use super::*;

    #[test]
    fn the_digest_is_over_the_exact_text_and_changes_with_one_byte() {
        let script = Script::parse(ROOT_KEY).unwrap();
        let mut expected = Sha256::new();
        expected.update(b"custody-ceremony-script/v1\n");
        expected.update(ROOT_KEY.as_bytes());
        assert_eq!(script.digest(), <[u8; 32]>::from(expected.finalize()));
        // A change that means the same TOML still changes the digest: the
        // officers signed these bytes.
        let spaced = Script::parse(&ROOT_KEY.replace("required = 2", "required  = 2")).unwrap();
        assert_eq!(spaced.kind(), script.kind());
        assert_eq!(spaced.quorum(), script.quorum());
        assert_eq!(spaced.officers(), script.officers());
        assert_ne!(spaced.digest(), script.digest());
        let mut bytes = ROOT_KEY.as_bytes().to_vec();
        let at = ROOT_KEY.find("Example Corp\"").unwrap();
        bytes[at] ^= 0x20; // 'E' to 'e'
        let changed = Script::parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
        assert_ne!(changed.digest(), script.digest());
    }

    #[test]
    fn the_quorum_follows_the_policy_rule_and_people_read_the_listed_order() {
        let text = ROOT_KEY.replace(
            r#"officers = ["alice", "bob", "carol"]"#,
            r#"officers = ["carol", "alice", "bob"]"#,
        );
        let script = Script::parse(&text).unwrap();
        let quorum = script.quorum();
        assert!(quorum.contains("carol") && quorum.contains("alice"));
        assert!(!quorum.contains("dave"));
        assert!(!quorum.is_met_by(1) && quorum.is_met_by(2));
        assert_eq!(script.officers(), ["carol", "alice", "bob"]);
        assert_eq!(script.participants(), ["carol", "alice", "bob"]);
        assert!(
            script
                .render_summary()
                .contains("2 of 3: carol, alice, bob"),
            "{}",
            script.render_summary()
        );
    }

    #[test]
    fn the_accessors_give_the_key_custodians_and_everyone_named() {
        let root = Script::parse(ROOT_KEY).unwrap();
        assert_eq!(root.kind_name(), "root-key");
        assert_eq!(root.key_id(), Some("root-ca"));
        assert!(root.custodians().is_empty());
        assert_eq!(root.participants(), ["alice", "bob", "carol"]);
        assert!(!root.seal_shares());

        let kek = Script::parse(KEK_GENERATE).unwrap();
        assert_eq!(kek.key_id(), Some("data-kek"));
        assert_eq!(kek.custodians(), ["alice", "bob", "carol"]);
        assert!(kek.seal_shares());

        let components = Script::parse(KEK_COMPONENTS).unwrap();
        assert_eq!(components.custodians(), ["dave", "erin", "frank"]);
        assert_eq!(
            components.participants(),
            ["alice", "bob", "dave", "erin", "frank"]
        );

        let restore = Script::parse(RESTORE).unwrap();
        assert_eq!(restore.kind_name(), "restore");
        assert_eq!(restore.key(), None);
        assert_eq!(restore.participants(), ["alice", "bob", "carol"]);
    }

    #[test]
    fn a_quorum_or_share_threshold_below_the_administrative_m_is_refused_naming_both() {
        let kek = Script::parse(KEK_GENERATE).unwrap();
        assert_eq!(kek.admin_quorum_at_most(), 2);
        assert_eq!(kek.check_admin_quorum(2), Ok(()));
        let error = kek.check_admin_quorum(3).unwrap_err();
        assert!(
            error.starts_with("quorum.required: 2 ") && error.contains("needs 3"),
            "{error}"
        );
        let shares_two = KEK_GENERATE.replace("required = 2", "required = 3");
        let kek = Script::parse(&shares_two).unwrap();
        assert_eq!(kek.admin_quorum_at_most(), 2);
        let error = kek.check_admin_quorum(3).unwrap_err();
        assert!(
            error.starts_with("shares.threshold: 2 ") && error.contains("needs 3"),
            "{error}"
        );
        // Components are entered, not shares: only the in-room quorum counts.
        let components = Script::parse(KEK_COMPONENTS).unwrap();
        assert_eq!(components.admin_quorum_at_most(), 2);
        for script in [ROOT_KEY, RESTORE] {
            let script = Script::parse(script).unwrap();
            assert_eq!(script.admin_quorum_at_most(), script.quorum().required);
            assert!(
                script
                    .check_admin_quorum(script.quorum().required + 1)
                    .is_err()
            );
        }
    }
}
