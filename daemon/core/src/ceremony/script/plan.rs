//! The steps a script's ceremony takes, and how they read to the officers
//! who review it: the numbered plan and the summary above it.

use super::{CertificateSection, KekMode, KeySection, Kind, ProfileSection, Script};
use crate::ceremony::fingerprint::hex_groups;

mod crl;
mod destruction;

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
    /// The to-be-signed certificate is built (serial from the HSM) and
    /// linted; officers see it and its SHA-256.
    Tbs,
    /// The issuer signs the confirmed TBS inside the HSM; the signature is
    /// verified with its public key.
    Certify,
    /// A new version of the key certified is made in pre-activation (or
    /// the one already staged is taken): it signs nothing until promoted.
    Stage,
    /// The issuer signs the confirmed TBS of a CRL inside the HSM; the
    /// signature is verified with its public key.
    SignCrl,
    /// The versions to destroy are checked and their manifest journaled;
    /// officers see it and its SHA-256.
    Manifest,
    /// Checked again, each object destroyed, its absence from the token
    /// verified, the versions recorded destroyed.
    Destroy,
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
            Step::Tbs => "tbs",
            Step::Certify => "certify",
            Step::Stage => "stage",
            Step::SignCrl => "sign-crl",
            Step::Manifest => "manifest",
            Step::Destroy => "destroy",
        }
    }
}

impl Script {
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
            Kind::Intermediate { stage, .. } => {
                let mut steps = vec![Step::SignIn];
                if *stage {
                    steps.push(Step::Stage);
                }
                steps.extend([Step::Tbs, Step::Confirm, Step::Certify, Step::Commit]);
                steps
            }
            Kind::Crl(_) => vec![
                Step::SignIn,
                Step::Tbs,
                Step::Confirm,
                Step::SignCrl,
                Step::Commit,
            ],
            Kind::KeyDestruction(_) => vec![
                Step::SignIn,
                Step::Manifest,
                Step::Confirm,
                Step::Destroy,
                Step::Commit,
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
                self.officers.len(),
                list(&self.officers),
                hex_groups(&self.text_digest)
            ),
            (step, Kind::Crl(section)) => crl::describe(step, section, &present),
            (step, Kind::KeyDestruction(section)) => {
                destruction::describe(step, section, &present)
            }
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
            (Step::Tbs, Kind::Intermediate {
                issuer,
                certificate_sha256: Some(source),
                certificate,
                profile,
                ..
            }) => format!(
                "custodyd checks the certificate sent with the start against its SHA-256 {}, that it is a CA certificate (basicConstraints cA) and that its key is allowed (ECDSA P-256/P-384 or RSA 2048-4096, not {issuer:?}'s own), draws a serial from the HSM and builds the certificate {issuer:?} would sign for that certificate's subject (byte for byte) and public key, keeping its subjectKeyIdentifier, valid {} days, {}, taking none of its other extensions; it lints it (CA/Browser Forum subordinate CA rules, under {issuer:?}'s root certificate) before any signature, and {present} see a summary and its SHA-256",
                hex::encode(source.as_slice()),
                certificate.validity_days,
                profile_line(profile)
            ),
            (Step::Tbs, Kind::Intermediate {
                issuer,
                csr_sha256: Some(csr),
                certificate,
                profile,
                ..
            }) => format!(
                "custodyd checks the CSR sent with the start against its SHA-256 {}, its self-signature and its key (ECDSA P-256/P-384 or RSA 2048-4096, not {issuer:?}'s own), draws a serial from the HSM and builds the certificate {issuer:?} would sign for the CSR's subject and public key, valid {} days, {}, ignoring any extension the CSR requests; it lints it (CA/Browser Forum subordinate CA rules, under {issuer:?}'s root certificate) before any signature, and {present} see a summary and its SHA-256",
                hex::encode(csr),
                certificate.validity_days,
                profile_line(profile)
            ),
            (Step::Tbs, Kind::Intermediate {
                issuer,
                key,
                certificate,
                profile,
                ..
            }) => format!(
                "custodyd draws a serial from the HSM and builds the certificate {issuer:?} would sign for the public key of {key:?}: {}, valid {} days, {}; it lints it (CA/Browser Forum subordinate CA rules, under {issuer:?}'s root certificate) before any signature, and {present} see a summary and its SHA-256",
                subject(certificate),
                certificate.validity_days,
                profile_line(profile)
            ),
            (Step::Confirm, Kind::Intermediate { .. }) => format!(
                "{present} read the TBS SHA-256 aloud as hex (16 groups of 4) and as 12 words, each compares it with the screen, and each signs it with their officer key: the HSM signs nothing else"
            ),
            (Step::Certify, Kind::Intermediate { issuer, .. }) => format!(
                "{issuer:?} signs the confirmed TBS inside the HSM; custodyd verifies the signature with {issuer:?}'s public key before anything leaves it"
            ),
            (Step::Stage, Kind::Intermediate { key, .. }) => format!(
                "custodyd makes a new version of {key:?} inside the HSM in pre-activation (or takes the one already staged, a pre-activation version newer than the current one); the current version keeps signing; the staged version signs nothing until it is promoted by activating it under {key:?}'s ROTATE and SET_STATE policies"
            ),
            (Step::Commit, Kind::Intermediate { issuer, certificate_sha256: Some(_), .. }) => format!(
                "the cross-certificate is recorded in the transcript and returned by `ceremony status --certificate-out` with {issuer:?}'s root certificate: the re-issued key is not in custody, so no key version holds it"
            ),
            (Step::Commit, Kind::Intermediate { issuer, csr_sha256: Some(_), .. }) => format!(
                "the certificate is recorded in the transcript and returned by `ceremony status --certificate-out` with {issuer:?}'s root certificate: the CSR's key is not in custody, so no key version holds it"
            ),
            (Step::Commit, Kind::Intermediate { issuer, key, stage: true, .. }) => format!(
                "the chain [the new certificate, {issuer:?}'s root certificate] is stored with {key:?}'s staged version, where its signers fetch it with GetKey; the current version keeps signing"
            ),
            (Step::Commit, Kind::Intermediate { issuer, key, .. }) => format!(
                "the chain [the new certificate, {issuer:?}'s root certificate] is stored with {key:?}'s current version, where its signers fetch it with GetKey"
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
                "{key_name} is registered in custodyd under its policy ({}) and becomes usable; until this step it cannot be used",
                key.map_or_else(String::new, |key| policy_lines(key).join("; "))
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
                audit_key_sha256,
                drill,
                ..
            }) => format!(
                "each key in the bundle {} (SHA-256 {}), whose manifest custodyd checked when the ceremony opened against {}, is unwrapped into {}",
                bundle.display(),
                hex_groups(bundle_sha256),
                trusted_signer(audit_key_sha256.as_ref()),
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
                    self.officers.len(),
                    list(&self.officers)
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
        let policy = |lines: &mut Vec<(&str, String)>, key: &KeySection| {
            for line in policy_lines(key) {
                lines.push(("policy", line));
            }
        };
        match &self.kind {
            Kind::RootKey { key, certificate } => {
                lines.push(("key", key_line(key)));
                policy(&mut lines, key);
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
                policy(&mut lines, key);
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
                audit_key_sha256,
                drill,
                custodians,
            } => {
                lines.push(("bundle", bundle.display().to_string()));
                lines.push(("bundle sha256", hex_groups(bundle_sha256)));
                lines.push((
                    "signed by",
                    match audit_key_sha256 {
                        Some(pin) => format!("the audit key with SHA-256 {}", hex_groups(pin)),
                        None => "custodyd's own audit key, or one pinned in its config (no audit key pinned here)".to_owned(),
                    },
                ));
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
            Kind::Intermediate {
                issuer,
                key,
                certificate,
                profile,
                stage,
                csr_sha256,
                certificate_sha256,
            } => {
                lines.push(("issuer", format!("{issuer} (its root certificate)")));
                lines.push((
                    "key",
                    if let Some(source) = certificate_sha256 {
                        format!(
                            "the subject and public key of the CA certificate of SHA-256 {} (cross-signed; its other extensions not taken)",
                            hex::encode(source.as_slice())
                        )
                    } else if let Some(csr) = csr_sha256 {
                        format!(
                            "the PKCS#10 CSR of SHA-256 {} (outside custody; its subject and public key; requested extensions ignored)",
                            hex::encode(csr)
                        )
                    } else if *stage {
                        format!(
                            "{key} (a staged version: pre-activation, not signing until promoted)"
                        )
                    } else {
                        format!("{key} (its current version)")
                    },
                ));
                lines.push((
                    "certificate",
                    if certificate_sha256.is_some() {
                        format!(
                            "the certificate's subject, valid {} days",
                            certificate.validity_days
                        )
                    } else if csr_sha256.is_some() {
                        format!(
                            "the CSR's subject, valid {} days",
                            certificate.validity_days
                        )
                    } else {
                        format!(
                            "{}, valid {} days",
                            subject(certificate),
                            certificate.validity_days
                        )
                    },
                ));
                lines.push(("profile", profile_line(profile)));
            }
            Kind::Crl(section) => lines.extend(crl::summary(section)),
            Kind::KeyDestruction(section) => lines.extend(destruction::summary(section)),
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

/// The audit key a restore's bundle must be signed by, as the plan says it.
fn trusted_signer(pin: Option<&[u8; 32]>) -> String {
    match pin {
        Some(pin) => format!(
            "the audit key the script pins (SPKI SHA-256 {}), and no other",
            hex_groups(pin)
        ),
        None => "custodyd's own audit key or one pinned in its config ([ceremony] trusted_audit_keys), and no other".to_owned(),
    }
}

/// The key's policy as officers read it: one line per declared kind
/// (`SIGN: 3 of 4: alice, bob, carol, dave`), then one for the kinds left
/// to the administrative quorum, whose officers and M are fixed when the
/// ceremony opens (the engine's transcript names them).
fn policy_lines(key: &KeySection) -> Vec<String> {
    let mut lines: Vec<String> = key
        .policy
        .iter()
        .map(|(kind, quorum)| {
            let members: Vec<String> = quorum.members.iter().cloned().collect();
            format!(
                "{kind}: {} of {}: {}",
                quorum.required,
                members.len(),
                list(&members)
            )
        })
        .collect();
    let defaulted = key.defaulted_kinds();
    if !defaulted.is_empty() {
        lines.push(format!(
            "{}: the administrative quorum (its officers and M when the ceremony opens)",
            defaulted.join(", ")
        ));
    }
    lines
}

fn list(ids: &[String]) -> String {
    ids.join(", ")
}

/// The profile as officers read it, one line.
fn profile_line(profile: &ProfileSection) -> String {
    let mut parts = vec![match profile.path_len {
        Some(n) => format!("CA, pathLen {n}"),
        None => "CA, no pathLen".to_owned(),
    }];
    let mut usage = vec!["keyCertSign", "cRLSign"];
    if profile.digital_signature {
        usage.push("digitalSignature");
    }
    parts.push(format!("keyUsage {}", usage.join(" ")));
    let named = |what: &str, values: &[String]| {
        (!values.is_empty()).then(|| format!("{what} {}", values.join(" ")))
    };
    parts.extend(
        [
            named("EKU", &profile.extended_key_usage),
            named("permitted DNS", &profile.permitted_dns_names),
            named("excluded DNS", &profile.excluded_dns_names),
            named("policies", &profile.certificate_policies),
            named("CRL", &profile.crl_distribution_points),
            named("OCSP", &profile.ocsp),
            named("caIssuers", &profile.ca_issuers),
        ]
        .into_iter()
        .flatten(),
    );
    parts.join("; ")
}

fn subject(certificate: &CertificateSection) -> String {
    format!(
        "C={}, O={}, CN={}",
        certificate.country, certificate.organization, certificate.common_name
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceremony::script::fixtures::{KEK_COMPONENTS, KEK_GENERATE, RESTORE, ROOT_KEY};

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
            plan[2].contains("C=DE, O=Example Corp, CN=Example Root CA"),
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
    fn the_summary_names_the_key_shares_and_bundle() {
        let summary = Script::parse(ROOT_KEY).unwrap().render_summary();
        assert!(summary.contains("root-2026 (root-key)"), "{summary}");
        assert!(summary.contains("2 of 3: alice, bob, carol"), "{summary}");
        assert!(
            summary.contains("root-ca, EC_SIGN_P384_SHA384, backup-exportable"),
            "{summary}"
        );
        assert!(
            summary.contains(
                "policy       SIGN, ROTATE, SET_STATE, SET_POLICY: the administrative quorum (its officers and M when the ceremony opens)"
            ),
            "{summary}"
        );
        let declared = ROOT_KEY.replacen(
            "\n[certificate]",
            "\n[key.policy.SIGN]\nofficers = [\"carol\", \"bob\", \"alice\"]\nrequired = 3\n\n[certificate]",
            1,
        );
        let declared = Script::parse(&declared).unwrap();
        let summary = declared.render_summary();
        assert!(
            summary.contains("policy       SIGN: 3 of 3: alice, bob, carol\n"),
            "{summary}"
        );
        assert!(
            summary
                .contains("policy       ROTATE, SET_STATE, SET_POLICY: the administrative quorum"),
            "{summary}"
        );
        let commit = declared.plan().pop().unwrap();
        assert!(
            commit.contains("under its policy (SIGN: 3 of 3: alice, bob, carol; ROTATE, SET_STATE, SET_POLICY: the administrative quorum"),
            "{commit}"
        );
        let summary = Script::parse(KEK_GENERATE).unwrap().render_summary();
        assert!(
            summary.contains("2 of 3: alice, bob, carol (sealed"),
            "{summary}"
        );
        assert!(summary.contains("policy  "), "{summary}");
        let summary = Script::parse(KEK_COMPONENTS).unwrap().render_summary();
        assert!(
            summary.contains("one each from dave, erin, frank"),
            "{summary}"
        );
        let summary = Script::parse(RESTORE).unwrap().render_summary();
        assert!(summary.contains("backups/backup.json"), "{summary}");
        assert!(summary.contains("0011 2233"), "{summary}");
        assert!(summary.contains("drill"), "{summary}");
        assert!(
            summary.lines().any(|line| line.starts_with("signed by")
                && line.ends_with("custodyd's own audit key, or one pinned in its config (no audit key pinned here)")),
            "{summary}"
        );
    }

    #[test]
    fn a_restore_plan_names_the_audit_key_the_bundle_must_be_signed_by() {
        let unpinned = Script::parse(RESTORE).unwrap();
        let unwrap = |script: &Script| {
            script
                .plan()
                .into_iter()
                .find(|line| line.contains(". unwrap: "))
                .unwrap()
        };
        assert!(
            unwrap(&unpinned).contains("custodyd's own audit key or one pinned in its config"),
            "{}",
            unwrap(&unpinned)
        );
        let pinned = Script::parse(&RESTORE.replace(
            "drill = true\n",
            &format!("drill = true\naudit_key_sha256 = \"{}\"\n", "ab".repeat(32)),
        ))
        .unwrap();
        let pin = hex_groups(&[0xab; 32]);
        assert!(unwrap(&pinned).contains(&pin), "{}", unwrap(&pinned));
        assert!(
            unwrap(&pinned).contains("and no other"),
            "{}",
            unwrap(&pinned)
        );
        let summary = pinned.render_summary();
        assert!(
            summary.lines().any(|line| line.starts_with("signed by")
                && line.ends_with(&format!("the audit key with SHA-256 {pin}"))),
            "{summary}"
        );
    }
}
