//! From the raw form to a [`Script`]: the rule every value must meet, the
//! sections each kind may have, and [`ScriptError`], which names the field
//! that broke a rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hsm_shim::KeySpec;

use super::raw::{RawCertificate, RawKey, RawQuorum, RawRestore, RawScript, RawShares};
use super::{CertificateSection, KekMode, KeySection, Kind, Script, SharesSection, script_digest};
use crate::algorithms::KeyAlgorithm;
use crate::algorithms::Purpose;
use crate::dual_control::operation::{KEY_POLICY_KINDS, KeyPolicies, policy_kind_applies};
use crate::dual_control::quorum::Quorum;
use crate::identity::valid_principal_name;

/// The only script format.
const FORMAT: i64 = 1;
const MAX_ID: usize = 48;
const MAX_DESCRIPTION: usize = 500;
const MAX_NAME: usize = 64;
/// 25 years: beyond any root CA lifetime a policy would sign off.
const MAX_VALIDITY_DAYS: i64 = 9125;
const MAX_QUORUM: usize = 16;
/// Officers one key policy may name.
const MAX_POLICY_OFFICERS: usize = 64;
const MAX_COMPONENTS: usize = 16;
/// The share format numbers shares in two digits.
const MAX_SHARES: usize = 99;

/// Why a script was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// Not TOML, a value of the wrong type, or a field or section the format
    /// does not have (toml's message, with the line it found it on).
    #[error("line {line}: {message}")]
    Syntax {
        /// 1-based line of the problem, 0 when toml gave no position.
        line: usize,
        /// What toml found wrong.
        message: String,
    },
    /// A field is missing, does not belong, or holds a value its rule
    /// refuses.
    #[error("{field}: {problem}")]
    Field {
        /// The field, as `section.name` (or the section's name).
        field: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

impl ScriptError {
    /// The field the error is about, for [`ScriptError::Field`].
    pub fn field(&self) -> Option<&str> {
        match self {
            ScriptError::Field { field, .. } => Some(field),
            ScriptError::Syntax { .. } => None,
        }
    }
}

pub(super) fn invalid(field: &str, problem: impl Into<String>) -> ScriptError {
    ScriptError::Field {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

pub(super) fn required<T>(value: Option<T>, field: &str, allowed: &str) -> Result<T, ScriptError> {
    value.ok_or_else(|| invalid(field, format!("missing; {allowed}")))
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn check_id(id: &str) -> Result<(), ScriptError> {
    if crate::names::is_identifier(id, MAX_ID) {
        Ok(())
    } else {
        Err(invalid(
            "id",
            format!(
                "{id:?} is not allowed: 1-{MAX_ID} lower-case letters, digits or '-', starting with a letter"
            ),
        ))
    }
}

/// Free text shown to officers: 1 to `max` characters, not blank, and none
/// of the characters [`crate::text`] keeps off screens (controls, which
/// could move the cursor or recolour the terminal, bidi and zero-width
/// characters, which reorder or hide what the officers see next to them).
pub(super) fn check_text(field: &str, text: &str, max: usize) -> Result<(), ScriptError> {
    if text.trim().is_empty() {
        return Err(invalid(field, format!("is empty; 1 to {max} characters")));
    }
    match crate::text::problem(text, max) {
        Some(problem) => Err(invalid(field, problem)),
        None => Ok(()),
    }
}

/// A list of officer ids: each valid, none twice, `min..=max` of them.
fn check_officers(
    field: &str,
    ids: Vec<String>,
    min: usize,
    max: usize,
    what: &str,
) -> Result<Vec<String>, ScriptError> {
    let mut seen = BTreeSet::new();
    for id in &ids {
        // Officer ids are principal names, as `dual_control` enrolls them.
        if !valid_principal_name(id) {
            return Err(invalid(
                field,
                format!(
                    "{id:?} is not an officer id: 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
                ),
            ));
        }
        if !seen.insert(id.as_str()) {
            return Err(invalid(field, format!("{id:?} is listed twice")));
        }
    }
    if !(min..=max).contains(&ids.len()) {
        return Err(invalid(
            field,
            format!("{} listed; {min} to {max} {what} are allowed", ids.len()),
        ));
    }
    Ok(ids)
}

/// `n` as a count between `min` and `max`, for the field's own message.
fn check_count(field: &str, n: i64, min: usize, max: usize, of: &str) -> Result<u8, ScriptError> {
    if n < min as i64 {
        return Err(invalid(
            field,
            format!("{n} is too few; at least {min}, at most the {max} {of} listed"),
        ));
    }
    if n > max as i64 {
        return Err(invalid(
            field,
            format!("{n} is more than the {max} {of} listed"),
        ));
    }
    u8::try_from(n).map_err(|_| invalid(field, format!("{n} is too large")))
}

/// A section the script's kind does not have.
fn absent<T>(section: &Option<T>, name: &str, why: &str) -> Result<(), ScriptError> {
    match section {
        Some(_) => Err(invalid(
            name,
            format!("this section does not belong here: {why}"),
        )),
        None => Ok(()),
    }
}

fn signing_algorithms() -> String {
    KeyAlgorithm::ALL
        .iter()
        .filter(|a| a.purpose() == Purpose::AsymmetricSign)
        .map(|a| a.api_name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn algorithm(name: &str) -> Result<KeyAlgorithm, ScriptError> {
    KeyAlgorithm::from_api_name(name).ok_or_else(|| {
        let known: Vec<&str> = KeyAlgorithm::ALL.iter().map(|a| a.api_name()).collect();
        invalid(
            "key.algorithm",
            format!("{name:?} is not an algorithm; one of: {}", known.join(", ")),
        )
    })
}

fn key_name(raw: &RawKey) -> Result<String, ScriptError> {
    let name = required(raw.name.clone(), "key.name", "the key id, e.g. \"root-ca\"")?;
    crate::names::check_key_id(&name).map_err(|_| {
        invalid(
            "key.name",
            format!(
                "{name:?} is not a key id: 1-63 lower-case letters, digits or '-', starting with a letter"
            ),
        )
    })?;
    Ok(name)
}

fn key_signers(raw: &RawKey) -> Result<Vec<String>, ScriptError> {
    let signers = raw.signers.clone().unwrap_or_default();
    if signers.len() > 256 {
        return Err(invalid("key.signers", "at most 256 principals"));
    }
    for signer in &signers {
        if !valid_principal_name(signer) {
            return Err(invalid(
                "key.signers",
                format!("{signer:?} is not a principal name"),
            ));
        }
    }
    if let Some(twice) = signers
        .iter()
        .enumerate()
        .find(|(i, s)| signers[..*i].contains(s))
    {
        return Err(invalid(
            "key.signers",
            format!("{} is listed twice", twice.1),
        ));
    }
    Ok(signers)
}

/// `[key.policy]`: one quorum per operation kind, each under the rule
/// every key policy follows. Whether it is as strong as the administrative
/// quorum, and names enrolled officers, is checked when the ceremony opens.
fn key_policy(raw: Option<BTreeMap<String, RawQuorum>>) -> Result<KeyPolicies, ScriptError> {
    let Some(raw) = raw else {
        return Ok(KeyPolicies::new());
    };
    if raw.is_empty() {
        return Err(invalid(
            "key.policy",
            "names no operation kind; declare [key.policy.SIGN] and so on, or leave [key.policy] out for the administrative quorum",
        ));
    }
    let mut policies = KeyPolicies::new();
    for (kind, quorum) in raw {
        let field = format!("key.policy.{kind}");
        if !KEY_POLICY_KINDS.contains(&kind.as_str()) {
            return Err(invalid(
                &field,
                format!(
                    "{kind:?} is not an operation kind a key policy governs; one of: {}",
                    KEY_POLICY_KINDS.join(", ")
                ),
            ));
        }
        let officers = check_officers(
            &format!("{field}.officers"),
            required(
                quorum.officers,
                &format!("{field}.officers"),
                "the officer ids who may approve (2 to 64)",
            )?,
            2,
            MAX_POLICY_OFFICERS,
            "officers",
        )?;
        let needed = required(
            quorum.required,
            &format!("{field}.required"),
            "how many of the officers must approve (2 to the number listed, at least the administrative quorum's)",
        )?;
        let needed = check_count(
            &format!("{field}.required"),
            needed,
            2,
            officers.len(),
            "officers",
        )?;
        let quorum =
            Quorum::new(officers, u32::from(needed)).map_err(|problem| invalid(&field, problem))?;
        policies.insert(kind, quorum);
    }
    Ok(policies)
}

/// Refuses a declared policy of a kind that could never act on a key of
/// `purpose` (a SIGN policy on a KEK, a DECRYPT policy on a root key): it
/// would read as protection and be none (threat model R6).
fn policy_kinds_fit(policy: &KeyPolicies, purpose: Purpose) -> Result<(), ScriptError> {
    match policy
        .keys()
        .find(|kind| !policy_kind_applies(kind, purpose))
    {
        Some(kind) => Err(invalid(
            &format!("key.policy.{kind}"),
            format!(
                "{kind} does not apply to an {} key; its policies govern: {}",
                purpose.api_name(),
                KEY_POLICY_KINDS
                    .into_iter()
                    .filter(|k| policy_kind_applies(k, purpose))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn root_key_section(raw: RawKey) -> Result<KeySection, ScriptError> {
    let name = key_name(&raw)?;
    let signers = key_signers(&raw)?;
    let policy = key_policy(raw.policy)?;
    let algorithm = algorithm(&required(
        raw.algorithm,
        "key.algorithm",
        &format!("a signing algorithm: {}", signing_algorithms()),
    )?)?;
    if algorithm.purpose() != Purpose::AsymmetricSign {
        return Err(invalid(
            "key.algorithm",
            format!(
                "{} is not a signing algorithm; a root key needs one of: {}",
                algorithm.api_name(),
                signing_algorithms()
            ),
        ));
    }
    policy_kinds_fit(&policy, Purpose::AsymmetricSign)?;
    // No default: whether a root key can ever leave the HSM (wrapped) is a
    // decision the officers make in the script they sign, not one a missing
    // line makes for them.
    let backup = required(
        raw.backup,
        "key.backup",
        "true (the key can be wrapped under the token's backup KEK) or false (never leaves the HSM)",
    )?;
    if backup && algorithm.key_spec() == KeySpec::Ed25519 {
        return Err(invalid(
            "key.backup",
            format!(
                "{} keys cannot be backup-exportable (SoftHSM2 cannot wrap Ed25519 keys); set backup = false or choose another algorithm",
                algorithm.api_name()
            ),
        ));
    }
    Ok(KeySection {
        name,
        algorithm,
        backup,
        signers,
        policy,
    })
}

fn kek_section(raw: RawKey, generate: bool) -> Result<KeySection, ScriptError> {
    let name = key_name(&raw)?;
    let signers = key_signers(&raw)?;
    let policy = key_policy(raw.policy)?;
    let algorithm = algorithm(&required(
        raw.algorithm,
        "key.algorithm",
        "AES_256_GCM (the only KEK algorithm)",
    )?)?;
    if algorithm.key_spec() != KeySpec::Aes256 {
        return Err(invalid(
            "key.algorithm",
            format!(
                "{} is not allowed for a KEK; only AES_256_GCM",
                algorithm.api_name()
            ),
        ));
    }
    policy_kinds_fit(&policy, Purpose::EncryptDecrypt)?;
    let backup = raw.backup.unwrap_or(generate);
    if generate && !backup {
        return Err(invalid(
            "key.backup",
            "must be true with mode = \"generate\": the new KEK is backed up under the backup KEK this ceremony splits into shares",
        ));
    }
    if !generate && backup {
        return Err(invalid(
            "key.backup",
            "must be false with mode = \"components\": the KEK is imported non-extractable, and its custodians' components are its backup",
        ));
    }
    Ok(KeySection {
        name,
        algorithm,
        backup,
        signers,
        policy,
    })
}

pub(super) fn certificate_section(raw: RawCertificate) -> Result<CertificateSection, ScriptError> {
    let common_name = required(
        raw.common_name,
        "certificate.common_name",
        "the root certificate's CN, 1 to 64 characters",
    )?;
    check_text("certificate.common_name", &common_name, MAX_NAME)?;
    let country = required(
        raw.country,
        "certificate.country",
        "the root certificate's C, an ISO 3166-1 alpha-2 code such as \"DE\"",
    )?;
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(
            "certificate.country",
            "is not an ISO 3166-1 alpha-2 code (two capital letters, such as \"DE\")",
        ));
    }
    let organization = required(
        raw.organization,
        "certificate.organization",
        "the root certificate's O, 1 to 64 characters (a CA/Browser Forum root names its organization)",
    )?;
    check_text("certificate.organization", &organization, MAX_NAME)?;
    let days = required(
        raw.validity_days,
        "certificate.validity_days",
        "1 to 9125 days",
    )?;
    if !(1..=MAX_VALIDITY_DAYS).contains(&days) {
        return Err(invalid(
            "certificate.validity_days",
            format!("{days} is not allowed; 1 to {MAX_VALIDITY_DAYS} days (25 years)"),
        ));
    }
    Ok(CertificateSection {
        country,
        organization,
        common_name,
        validity_days: u32::try_from(days)
            .map_err(|_| invalid("certificate.validity_days", "too large"))?,
    })
}

fn shares_section(raw: RawShares) -> Result<SharesSection, ScriptError> {
    let custodians = check_officers(
        "shares.custodians",
        required(
            raw.custodians,
            "shares.custodians",
            "the officer ids who each hold one share (N, 2 to 99)",
        )?,
        2,
        MAX_SHARES,
        "custodians",
    )?;
    let threshold = required(
        raw.threshold,
        "shares.threshold",
        "K, the shares needed to rebuild the backup KEK (2 to the number of custodians)",
    )?;
    let threshold = check_count(
        "shares.threshold",
        threshold,
        2,
        custodians.len(),
        "custodians",
    )?;
    Ok(SharesSection {
        threshold,
        custodians,
        encrypt_to_officer_keys: raw.encrypt_to_officer_keys.unwrap_or(false),
    })
}

fn restore_kind(raw: RawRestore) -> Result<Kind, ScriptError> {
    let bundle = required(
        raw.bundle,
        "restore.bundle",
        "the backup bundle's path, relative to the script file",
    )?;
    if bundle.is_empty() || Path::new(&bundle).is_absolute() {
        return Err(invalid(
            "restore.bundle",
            format!("{bundle:?} is not allowed: a path relative to the script file"),
        ));
    }
    if crate::text::first_hidden(&bundle).is_some() {
        return Err(invalid(
            "restore.bundle",
            "contains a control, bidi or zero-width character; a path relative to the script file",
        ));
    }
    let sha256 = required(
        raw.bundle_sha256,
        "restore.bundle_sha256",
        "the SHA-256 of the bundle file, 64 hex digits",
    )?;
    let bundle_sha256: [u8; 32] = hex::decode(&sha256)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| {
            invalid(
                "restore.bundle_sha256",
                format!("{sha256:?} is not a SHA-256: 64 hex digits"),
            )
        })?;
    // Optional: a bundle this custodyd made verifies with its own audit key,
    // and a deployment may pin its sources' keys in config instead.
    let audit_key_sha256 = raw
        .audit_key_sha256
        .map(|pin| {
            hex::decode(&pin)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| {
                    invalid(
                        "restore.audit_key_sha256",
                        format!(
                            "{pin:?} is not a SHA-256: 64 hex digits, the SHA-256 of the source's audit key (SPKI DER) as it published it"
                        ),
                    )
                })
        })
        .transpose()?;
    // No default: a drill and a real restore differ in whether custodyd's
    // own token changes.
    let drill = required(
        raw.drill,
        "restore.drill",
        "true (into a scratch token, verified, then destroyed) or false (into custodyd's own token, keys registered)",
    )?;
    let custodians = check_officers(
        "restore.custodians",
        required(
            raw.custodians,
            "restore.custodians",
            "the officer ids allowed to submit a share",
        )?,
        // A backup KEK's shares have a threshold of at least 2.
        2,
        MAX_SHARES,
        "custodians",
    )?;
    Ok(Kind::Restore {
        bundle: PathBuf::from(bundle),
        bundle_sha256,
        audit_key_sha256,
        drill,
        custodians,
    })
}

impl Script {
    /// Parses and validates a script. The digest is over `text` exactly as
    /// given; pass the file's bytes unchanged.
    pub fn parse(text: &str) -> Result<Script, ScriptError> {
        let raw: RawScript = toml::from_str(text).map_err(|e| ScriptError::Syntax {
            line: e.span().map_or(0, |span| line_of(text, span.start)),
            message: e.message().trim().to_owned(),
        })?;
        let format = required(raw.format, "format", "format = 1")?;
        if format != FORMAT {
            return Err(invalid(
                "format",
                format!("{format} is not a script format; only 1"),
            ));
        }
        let id = required(raw.id, "id", "the ceremony id, e.g. \"root-2026\"")?;
        check_id(&id)?;
        let kind_name = required(
            raw.kind,
            "kind",
            "\"root-key\", \"kek\", \"restore\", \"intermediate\", \"cross-sign\", \"crl\" or \"key-destruction\"",
        )?;
        let description = required(
            raw.description,
            "description",
            "what the ceremony is for, 1 to 500 characters",
        )?;
        check_text("description", &description, MAX_DESCRIPTION)?;
        let quorum = required(raw.quorum, "quorum", "a [quorum] section")?;
        let officers = check_officers(
            "quorum.officers",
            required(
                quorum.officers,
                "quorum.officers",
                "the officer ids who may sign in (2 to 16)",
            )?,
            2,
            MAX_QUORUM,
            "officers",
        )?;
        let needed = required(
            quorum.required,
            "quorum.required",
            "how many of the officers must sign in (2 to the number listed)",
        )?;
        let needed = check_count("quorum.required", needed, 2, officers.len(), "officers")?;
        // The checks above name the field in the script's words; the quorum
        // is made under the rule key policies use, which they imply.
        let quorum = Quorum::new(officers.iter().cloned(), u32::from(needed))
            .map_err(|problem| invalid("quorum", problem))?;

        if kind_name != "cross-sign" {
            absent(
                &raw.cross_sign,
                "cross_sign",
                "only a cross-sign script has [cross_sign]",
            )?;
        }
        let kind = match kind_name.as_str() {
            "root-key" => {
                let why = "a root-key script has [quorum], [key] and optionally [certificate]";
                absent(&raw.kek, "kek", why)?;
                absent(&raw.shares, "shares", why)?;
                absent(&raw.components, "components", why)?;
                absent(&raw.restore, "restore", why)?;
                absent(&raw.intermediate, "intermediate", why)?;
                absent(&raw.profile, "profile", why)?;
                absent(&raw.crl, "crl", why)?;
                absent(&raw.destruction, "destruction", why)?;
                let key = root_key_section(required(raw.key, "key", "a [key] section")?)?;
                let certificate = raw.certificate.map(certificate_section).transpose()?;
                if certificate.is_some() && !crate::ceremony::certificate::supported(key.algorithm)
                {
                    return Err(invalid(
                        "certificate",
                        format!(
                            "no root certificate for {} keys (rcgen cannot sign RSASSA-PSS with a key it does not hold): use ECDSA, Ed25519 or RSA PKCS#1, or leave [certificate] out",
                            key.algorithm.api_name()
                        ),
                    ));
                }
                Kind::RootKey { key, certificate }
            }
            "kek" => {
                let why = "a kek script has [quorum], [key], [kek] and [shares] or [components]";
                absent(&raw.certificate, "certificate", why)?;
                absent(&raw.restore, "restore", why)?;
                absent(&raw.intermediate, "intermediate", why)?;
                absent(&raw.profile, "profile", why)?;
                absent(&raw.crl, "crl", why)?;
                absent(&raw.destruction, "destruction", why)?;
                let kek = required(raw.kek, "kek", "a [kek] section")?;
                let mode = required(kek.mode, "kek.mode", "\"generate\" or \"components\"")?;
                let key = required(raw.key, "key", "a [key] section")?;
                match mode.as_str() {
                    "generate" => {
                        absent(
                            &raw.components,
                            "components",
                            "with mode = \"generate\" the custodians hold shares, in [shares]",
                        )?;
                        let key = kek_section(key, true)?;
                        let shares = required(raw.shares, "shares", "a [shares] section")?;
                        let shares = shares_section(shares)?;
                        Kind::Kek {
                            key,
                            mode: KekMode::Generate { shares },
                        }
                    }
                    "components" => {
                        absent(
                            &raw.shares,
                            "shares",
                            "with mode = \"components\" the custodians enter components, in [components]",
                        )?;
                        let key = kek_section(key, false)?;
                        let components =
                            required(raw.components, "components", "a [components] section")?;
                        let custodians = check_officers(
                            "components.custodians",
                            required(
                                components.custodians,
                                "components.custodians",
                                "the officer ids who each enter one component (2 to 16)",
                            )?,
                            2,
                            MAX_COMPONENTS,
                            "custodians",
                        )?;
                        Kind::Kek {
                            key,
                            mode: KekMode::Components { custodians },
                        }
                    }
                    other => {
                        return Err(invalid(
                            "kek.mode",
                            format!("{other:?} is not a mode; \"generate\" or \"components\""),
                        ));
                    }
                }
            }
            "restore" => {
                let why =
                    "a restore script has [quorum] and [restore]; the keys come from the bundle";
                absent(&raw.key, "key", why)?;
                absent(&raw.certificate, "certificate", why)?;
                absent(&raw.kek, "kek", why)?;
                absent(&raw.shares, "shares", why)?;
                absent(&raw.components, "components", why)?;
                absent(&raw.intermediate, "intermediate", why)?;
                absent(&raw.profile, "profile", why)?;
                absent(&raw.crl, "crl", why)?;
                absent(&raw.destruction, "destruction", why)?;
                restore_kind(required(raw.restore, "restore", "a [restore] section")?)?
            }
            "intermediate" => {
                let why = "an intermediate script has [quorum], [intermediate], [certificate] and [profile]";
                absent(&raw.key, "key", why)?;
                absent(&raw.kek, "kek", why)?;
                absent(&raw.shares, "shares", why)?;
                absent(&raw.components, "components", why)?;
                absent(&raw.restore, "restore", why)?;
                absent(&raw.crl, "crl", why)?;
                absent(&raw.destruction, "destruction", why)?;
                intermediate::kind(raw.intermediate, raw.certificate, raw.profile)?
            }
            "cross-sign" => {
                let why =
                    "a cross-sign script has [quorum], [cross_sign], [certificate] and [profile]";
                absent(&raw.key, "key", why)?;
                absent(&raw.kek, "kek", why)?;
                absent(&raw.shares, "shares", why)?;
                absent(&raw.components, "components", why)?;
                absent(&raw.restore, "restore", why)?;
                absent(&raw.intermediate, "intermediate", why)?;
                absent(&raw.crl, "crl", why)?;
                absent(&raw.destruction, "destruction", why)?;
                intermediate::cross_sign_kind(raw.cross_sign, raw.certificate, raw.profile)?
            }
            "crl" => {
                let why = "a crl script has [quorum] and [crl]";
                absent(&raw.key, "key", why)?;
                absent(&raw.certificate, "certificate", why)?;
                absent(&raw.kek, "kek", why)?;
                absent(&raw.shares, "shares", why)?;
                absent(&raw.components, "components", why)?;
                absent(&raw.restore, "restore", why)?;
                absent(&raw.intermediate, "intermediate", why)?;
                absent(&raw.profile, "profile", why)?;
                absent(&raw.destruction, "destruction", why)?;
                crl::kind(raw.crl)?
            }
            "key-destruction" => destruction::kind(
                raw.destruction,
                &[
                    ("key", raw.key.is_some()),
                    ("certificate", raw.certificate.is_some()),
                    ("kek", raw.kek.is_some()),
                    ("shares", raw.shares.is_some()),
                    ("components", raw.components.is_some()),
                    ("restore", raw.restore.is_some()),
                    ("intermediate", raw.intermediate.is_some()),
                    ("profile", raw.profile.is_some()),
                    ("crl", raw.crl.is_some()),
                ],
            )?,
            other => {
                return Err(invalid(
                    "kind",
                    format!(
                        "{other:?} is not a kind; \"root-key\", \"kek\", \"restore\", \"intermediate\", \"cross-sign\", \"crl\" or \"key-destruction\""
                    ),
                ));
            }
        };
        Ok(Script {
            id,
            kind,
            description,
            quorum,
            officers,
            text_digest: script_digest(text.as_bytes()),
        })
    }
}

mod crl;
mod destruction;
mod intermediate;

#[cfg(test)]
mod cross_sign_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
