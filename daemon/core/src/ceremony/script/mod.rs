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

mod raw;
mod validate;

pub use validate::ScriptError;

use std::collections::BTreeSet;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::algorithms::KeyAlgorithm;
use crate::ceremony::fingerprint::hex_groups;
use hsm_shim::KeySpec;

/// The domain prefix of a script digest.
pub const SCRIPT_DIGEST_DOMAIN: &[u8] = b"custody-ceremony-script/v1\n";

/// A validated ceremony script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    id: String,
    kind: Kind,
    description: String,
    quorum: Quorum,
    text_digest: [u8; 32],
}

/// `[quorum]`: the officers who must be present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quorum {
    /// The officers who may sign in, by officer id (2 to 16, distinct).
    pub officers: Vec<String>,
    /// How many of them must sign in (2 to `officers.len()`).
    pub required: u8,
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
        /// True: into the scratch token, verified, destroyed. False: into
        /// custodyd's own token, keys registered.
        drill: bool,
        /// Officers allowed to submit a share (2 to 99, distinct).
        custodians: Vec<String>,
    },
}

impl Kind {
    /// The name in the script and transcripts: `root-key`, `kek`, `restore`.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::RootKey { .. } => "root-key",
            Kind::Kek { .. } => "kek",
            Kind::Restore { .. } => "restore",
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
}

impl KeySection {
    /// The HSM key spec to generate or import.
    pub fn spec(&self) -> KeySpec {
        self.algorithm.key_spec()
    }
}

/// `[certificate]`: a self-signed root certificate for a root key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSection {
    /// Subject and issuer CN (1-64 characters).
    pub common_name: String,
    /// Subject and issuer O (1-64 characters), if any.
    pub organization: Option<String>,
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

/// A step of a ceremony, in the order [`Script::steps`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// The required officers sign the script digest.
    SignIn,
    /// The key is made inside the HSM.
    Generate,
    /// The new key signs its self-signed root certificate.
    Certificate,
    /// The officers sign the fingerprint they read aloud.
    Confirm,
    /// The key is registered and becomes usable.
    Commit,
    /// The backup KEK is made, split into shares and imported.
    BackupKek,
    /// Each custodian collects their own share.
    DistributeShares,
    /// The new KEK is wrapped under the backup KEK into a signed bundle.
    Backup,
    /// Each custodian enters their component.
    Components,
    /// The components are combined and imported.
    Import,
    /// Custodians submit their shares of the backup KEK.
    SubmitShares,
    /// The backup KEK is rebuilt and imported as a session object.
    RebuildKek,
    /// Each key in the bundle is unwrapped.
    Unwrap,
    /// Each unwrapped key is checked against the manifest and made to work.
    Verify,
    /// A drill's restored keys are destroyed from the scratch token.
    DestroyScratch,
}

impl Step {
    /// The name in plans and transcripts: `sign-in`, `generate`, ….
    pub fn name(&self) -> &'static str {
        match self {
            Step::SignIn => "sign-in",
            Step::Generate => "generate",
            Step::Certificate => "certificate",
            Step::Confirm => "confirm",
            Step::Commit => "commit",
            Step::BackupKek => "backup-kek",
            Step::DistributeShares => "distribute-shares",
            Step::Backup => "backup",
            Step::Components => "components",
            Step::Import => "import",
            Step::SubmitShares => "submit-shares",
            Step::RebuildKek => "rebuild-kek",
            Step::Unwrap => "unwrap",
            Step::Verify => "verify",
            Step::DestroyScratch => "destroy-scratch",
        }
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

    /// Who must be present.
    pub fn quorum(&self) -> &Quorum {
        &self.quorum
    }

    /// The kind's name: `root-key`, `kek` or `restore`.
    pub fn kind_name(&self) -> &'static str {
        self.kind.name()
    }

    /// `[key]`, for root-key and kek scripts.
    pub fn key(&self) -> Option<&KeySection> {
        match &self.kind {
            Kind::RootKey { key, .. } | Kind::Kek { key, .. } => Some(key),
            Kind::Restore { .. } => None,
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
            Kind::RootKey { .. } => &[],
        }
    }

    /// Every officer the script names, quorum first, each once: all must be
    /// enrolled before the ceremony opens.
    pub fn participants(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.quorum
            .officers
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

    /// The steps, in order.
    pub fn steps(&self) -> Vec<Step> {
        match &self.kind {
            Kind::RootKey { certificate, .. } => {
                let mut steps = vec![Step::SignIn, Step::Generate];
                if certificate.is_some() {
                    steps.push(Step::Certificate);
                }
                steps.extend([Step::Confirm, Step::Commit]);
                steps
            }
            Kind::Kek {
                mode: KekMode::Generate { .. },
                ..
            } => vec![
                Step::SignIn,
                Step::BackupKek,
                Step::DistributeShares,
                Step::Generate,
                Step::Backup,
                Step::Confirm,
                Step::Commit,
            ],
            Kind::Kek {
                mode: KekMode::Components { .. },
                ..
            } => vec![
                Step::SignIn,
                Step::Components,
                Step::Import,
                Step::Confirm,
                Step::Commit,
            ],
            Kind::Restore { drill, .. } => vec![
                Step::SignIn,
                Step::SubmitShares,
                Step::RebuildKek,
                Step::Unwrap,
                Step::Verify,
                if *drill {
                    Step::DestroyScratch
                } else {
                    Step::Commit
                },
            ],
        }
    }

    /// The plan: one numbered line per step saying what happens, who takes
    /// part, and what they see and confirm.
    pub fn plan(&self) -> Vec<String> {
        self.steps()
            .into_iter()
            .enumerate()
            .map(|(i, step)| format!("{}. {}: {}", i + 1, step.name(), self.describe(step)))
            .collect()
    }

    fn describe(&self, step: Step) -> String {
        let quorum = &self.quorum;
        let present = format!("the {} officers who signed in", quorum.required);
        let key = self.key();
        let key_name = key.map_or_else(String::new, |k| format!("{:?}", k.name));
        let algorithm = key.map_or("", |k| k.algorithm.api_name());
        match (step, &self.kind) {
            (Step::SignIn, _) => format!(
                "{} of the {} officers ({}) each check that the script digest on screen, {}, is the one `custodyctl ceremony check` printed for the copy they reviewed, and sign it with their officer key",
                quorum.required,
                quorum.officers.len(),
                list(&quorum.officers),
                hex_groups(&self.text_digest)
            ),
            (Step::Generate, Kind::RootKey { key, .. }) => format!(
                "custodyd generates the key pair {key_name} ({algorithm}) inside the HSM and runs a pair-wise consistency test; {}; {present} see the result",
                if key.backup {
                    "it is backup-exportable: it can leave the HSM only wrapped under the token's backup KEK"
                } else {
                    "it is not exportable: it never leaves the HSM"
                }
            ),
            (Step::Generate, _) => format!(
                "custodyd generates the KEK {key_name} ({algorithm}) inside the HSM; it can leave the HSM only wrapped under the backup KEK"
            ),
            (Step::Certificate, Kind::RootKey {
                certificate: Some(certificate),
                ..
            }) => format!(
                "{key_name} signs its self-signed root certificate inside the HSM: {}, valid {} days; {present} see its subject, validity and serial",
                subject(certificate),
                certificate.validity_days
            ),
            (Step::Confirm, Kind::RootKey { .. }) => format!(
                "{present} read the public key fingerprint aloud as hex (16 groups of 4) and as 12 words, each compares it with the screen, and each signs it with their officer key"
            ),
            (Step::Confirm, _) => format!(
                "{present} read the KEK's check value (KCV, 6 hex digits) aloud, each compares it with the screen, and each signs it with their officer key"
            ),
            (Step::Commit, Kind::Restore { .. }) => {
                "the restored keys are registered in custodyd and become usable".to_owned()
            }
            (Step::Commit, _) => format!(
                "{key_name} is registered in custodyd and becomes usable; until this step it cannot be used"
            ),
            (Step::BackupKek, Kind::Kek {
                mode: KekMode::Generate { shares },
                ..
            }) => format!(
                "the HSM makes a 32-byte backup KEK; it is split into {} of {} shares and imported by the token security officer as the token's trusted backup KEK; {present} see its KCV",
                shares.threshold,
                shares.custodians.len()
            ),
            (Step::DistributeShares, Kind::Kek {
                mode: KekMode::Generate { shares },
                ..
            }) => format!(
                "each of {} collects only their own share, once{}; any {} of the {} shares rebuild the backup KEK, fewer reveal nothing",
                list(&shares.custodians),
                if shares.encrypt_to_officer_keys {
                    ", sealed to their officer key"
                } else {
                    ", as text to write down (a checksummed line)"
                },
                shares.threshold,
                shares.custodians.len()
            ),
            (Step::Backup, _) => format!(
                "{key_name} is wrapped (RFC 5649) under the backup KEK into a backup bundle signed with the audit key"
            ),
            (Step::Components, Kind::Kek {
                mode: KekMode::Components { custodians },
                ..
            }) => format!(
                "each of {} in turn enters their 32-byte component; its KCV is shown and the custodian confirms it matches the KCV recorded with the component",
                list(custodians)
            ),
            (Step::Import, Kind::Kek {
                mode: KekMode::Components { custodians },
                ..
            }) => format!(
                "the {} components are XORed in zeroizing memory and imported as {key_name} ({algorithm}), not extractable; {present} see its KCV",
                custodians.len()
            ),
            (Step::SubmitShares, Kind::Restore { custodians, .. }) => format!(
                "custodians from {} each submit their own share of the backup KEK, as many as the bundle's threshold; each share is checked before any are combined",
                list(custodians)
            ),
            (Step::RebuildKek, _) => {
                "custodyd rebuilds the backup KEK from the shares, checks it against the digest every share carries, and imports it into the HSM as a session object".to_owned()
            }
            (Step::Unwrap, Kind::Restore {
                bundle,
                bundle_sha256,
                drill,
                ..
            }) => format!(
                "each key in the bundle {} (SHA-256 {}) is unwrapped into {}",
                bundle.display(),
                hex_groups(bundle_sha256),
                if *drill {
                    "a scratch token"
                } else {
                    "custodyd's own token"
                }
            ),
            (Step::Verify, _) => {
                "each key pair's public key fingerprint is checked against the bundle's manifest, and the key signs a challenge verified against its published public key; each AES key decrypts the manifest's check ciphertext".to_owned()
            }
            (Step::DestroyScratch, _) => {
                "the restored keys are destroyed in the scratch token; custodyd's own token and keys are unchanged".to_owned()
            }
            // Steps `steps()` never gives for this kind.
            (step, kind) => format!("({} has no {} step)", kind.name(), step.name()),
        }
    }

    /// The header shown above the plan: id, kind, description, quorum, and
    /// the kind's key, certificate, shares, components or bundle.
    pub fn render_summary(&self) -> String {
        let mut lines = vec![
            ("ceremony", format!("{} ({})", self.id, self.kind.name())),
            ("description", self.description.clone()),
            (
                "quorum",
                format!(
                    "{} of {}: {}",
                    self.quorum.required,
                    self.quorum.officers.len(),
                    list(&self.quorum.officers)
                ),
            ),
        ];
        let key_line = |key: &KeySection| {
            format!(
                "{}, {}, {}",
                key.name,
                key.algorithm.api_name(),
                if key.backup {
                    "backup-exportable"
                } else {
                    "not exportable"
                }
            )
        };
        match &self.kind {
            Kind::RootKey { key, certificate } => {
                lines.push(("key", key_line(key)));
                if let Some(certificate) = certificate {
                    lines.push((
                        "certificate",
                        format!(
                            "{}, valid {} days",
                            subject(certificate),
                            certificate.validity_days
                        ),
                    ));
                }
            }
            Kind::Kek { key, mode } => {
                lines.push(("key", key_line(key)));
                match mode {
                    KekMode::Generate { shares } => lines.push((
                        "shares",
                        format!(
                            "{} of {}: {}{}",
                            shares.threshold,
                            shares.custodians.len(),
                            list(&shares.custodians),
                            if shares.encrypt_to_officer_keys {
                                " (sealed to officer keys)"
                            } else {
                                ""
                            }
                        ),
                    )),
                    KekMode::Components { custodians } => {
                        lines.push(("components", format!("one each from {}", list(custodians))))
                    }
                }
            }
            Kind::Restore {
                bundle,
                bundle_sha256,
                drill,
                custodians,
            } => {
                lines.push(("bundle", bundle.display().to_string()));
                lines.push(("bundle sha256", hex_groups(bundle_sha256)));
                lines.push((
                    "mode",
                    if *drill {
                        "drill: into a scratch token, verified, then destroyed".to_owned()
                    } else {
                        "restore: into custodyd's own token, keys registered".to_owned()
                    },
                ));
                lines.push(("custodians", list(custodians)));
            }
        }
        let width = lines
            .iter()
            .map(|(label, _)| label.len())
            .max()
            .unwrap_or(0);
        lines
            .iter()
            .map(|(label, value)| format!("{label:<width$}  {value}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn list(ids: &[String]) -> String {
    ids.join(", ")
}

fn subject(certificate: &CertificateSection) -> String {
    match &certificate.organization {
        Some(organization) => format!("CN={}, O={organization}", certificate.common_name),
        None => format!("CN={}", certificate.common_name),
    }
}

#[cfg(test)]
mod fixtures;

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
        assert_ne!(spaced.digest(), script.digest());
        let mut bytes = ROOT_KEY.as_bytes().to_vec();
        let at = ROOT_KEY.find("Example Corp\"").unwrap();
        bytes[at] ^= 0x20; // 'E' to 'e'
        let changed = Script::parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
        assert_ne!(changed.digest(), script.digest());
    }

    #[test]
    fn the_plan_numbers_every_step_and_says_who_sees_what() {
        let script = Script::parse(ROOT_KEY).unwrap();
        let plan = script.plan();
        assert_eq!(plan.len(), script.steps().len());
        for (i, (line, step)) in plan.iter().zip(script.steps()).enumerate() {
            assert!(
                line.starts_with(&format!("{}. {}: ", i + 1, step.name())),
                "{line}"
            );
            assert!(!line.contains("has no"), "{line}");
        }
        assert!(
            plan[0].contains("2 of the 3 officers (alice, bob, carol)"),
            "{}",
            plan[0]
        );
        assert!(
            plan[0].contains(&hex_groups(&script.digest())),
            "{}",
            plan[0]
        );
        assert!(
            plan[2].contains("CN=Example Root CA, O=Example Corp"),
            "{}",
            plan[2]
        );
        assert!(plan[3].contains("12 words"), "{}", plan[3]);
        for text in [KEK_GENERATE, KEK_COMPONENTS, RESTORE] {
            let script = Script::parse(text).unwrap();
            for line in script.plan() {
                assert!(!line.contains("has no"), "{line}");
                println!("{line}");
            }
        }
        let kek = Script::parse(KEK_GENERATE).unwrap().plan();
        assert!(kek[2].contains("sealed to their officer key"), "{}", kek[2]);
        assert!(kek[5].contains("KCV"), "{}", kek[5]);
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
    fn the_summary_names_the_key_shares_and_bundle() {
        let summary = Script::parse(ROOT_KEY).unwrap().render_summary();
        assert!(summary.contains("root-2026 (root-key)"), "{summary}");
        assert!(summary.contains("2 of 3: alice, bob, carol"), "{summary}");
        assert!(
            summary.contains("root-ca, EC_SIGN_P384_SHA384, backup-exportable"),
            "{summary}"
        );
        let summary = Script::parse(KEK_GENERATE).unwrap().render_summary();
        assert!(
            summary.contains("2 of 3: alice, bob, carol (sealed"),
            "{summary}"
        );
        let summary = Script::parse(KEK_COMPONENTS).unwrap().render_summary();
        assert!(
            summary.contains("one each from dave, erin, frank"),
            "{summary}"
        );
        let summary = Script::parse(RESTORE).unwrap().render_summary();
        assert!(summary.contains("backups/backup.json"), "{summary}");
        assert!(summary.contains("0011 2233"), "{summary}");
        assert!(summary.contains("drill"), "{summary}");
    }
}
