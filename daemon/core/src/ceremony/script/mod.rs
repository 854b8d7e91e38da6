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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::algorithms::KeyAlgorithm;
use crate::algorithms::Purpose;
use crate::ceremony::fingerprint::hex_groups;
use crate::identity::valid_principal_name;
use hsm_shim::KeySpec;
use raw::{RawCertificate, RawKey, RawRestore, RawScript, RawShares};

/// The domain prefix of a script digest.
pub const SCRIPT_DIGEST_DOMAIN: &[u8] = b"custody-ceremony-script/v1\n";
/// The only script format.
const FORMAT: i64 = 1;
const MAX_ID: usize = 48;
const MAX_DESCRIPTION: usize = 500;
const MAX_NAME: usize = 64;
/// 25 years: beyond any root CA lifetime a policy would sign off.
const MAX_VALIDITY_DAYS: i64 = 9125;
const MAX_QUORUM: usize = 16;
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

fn invalid(field: &str, problem: impl Into<String>) -> ScriptError {
    ScriptError::Field {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

fn required<T>(value: Option<T>, field: &str, allowed: &str) -> Result<T, ScriptError> {
    value.ok_or_else(|| invalid(field, format!("missing; {allowed}")))
}

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
    let valid = !id.is_empty()
        && id.len() <= MAX_ID
        && id.as_bytes()[0].is_ascii_lowercase()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
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

/// Free text shown to officers: 1 to `max` characters, not blank, and no
/// control characters, which could move the cursor or recolour the terminal
/// and so change what the officers see next to it.
fn check_text(field: &str, text: &str, max: usize) -> Result<(), ScriptError> {
    let chars = text.chars().count();
    if text.trim().is_empty() {
        return Err(invalid(field, format!("is empty; 1 to {max} characters")));
    }
    if chars > max {
        return Err(invalid(
            field,
            format!("{chars} characters is too long; 1 to {max} characters"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(
            field,
            "contains a control character (line break, tab, escape …); one line of printable text",
        ));
    }
    Ok(())
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

fn root_key_section(raw: RawKey) -> Result<KeySection, ScriptError> {
    let name = key_name(&raw)?;
    let signers = key_signers(&raw)?;
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
    })
}

fn kek_section(raw: RawKey, generate: bool) -> Result<KeySection, ScriptError> {
    let name = key_name(&raw)?;
    let signers = key_signers(&raw)?;
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
    })
}

fn certificate_section(raw: RawCertificate) -> Result<CertificateSection, ScriptError> {
    let common_name = required(
        raw.common_name,
        "certificate.common_name",
        "the root certificate's CN, 1 to 64 characters",
    )?;
    check_text("certificate.common_name", &common_name, MAX_NAME)?;
    if let Some(organization) = &raw.organization {
        check_text("certificate.organization", organization, MAX_NAME)?;
    }
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
        common_name,
        organization: raw.organization,
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
    if bundle.chars().any(char::is_control) {
        return Err(invalid(
            "restore.bundle",
            "contains a control character; a path relative to the script file",
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
        let kind_name = required(raw.kind, "kind", "\"root-key\", \"kek\" or \"restore\"")?;
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
        let quorum = Quorum {
            required: check_count("quorum.required", needed, 2, officers.len(), "officers")?,
            officers,
        };

        let kind = match kind_name.as_str() {
            "root-key" => {
                let why = "a root-key script has [quorum], [key] and optionally [certificate]";
                absent(&raw.kek, "kek", why)?;
                absent(&raw.shares, "shares", why)?;
                absent(&raw.components, "components", why)?;
                absent(&raw.restore, "restore", why)?;
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
                        Kind::Kek {
                            key,
                            mode: KekMode::Generate {
                                shares: shares_section(shares)?,
                            },
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
                restore_kind(required(raw.restore, "restore", "a [restore] section")?)?
            }
            other => {
                return Err(invalid(
                    "kind",
                    format!("{other:?} is not a kind; \"root-key\", \"kek\" or \"restore\""),
                ));
            }
        };
        Ok(Script {
            id,
            kind,
            description,
            quorum,
            text_digest: script_digest(text.as_bytes()),
        })
    }

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

    fn names(script: &Script) -> Vec<&'static str> {
        script.steps().iter().map(Step::name).collect()
    }

    #[test]
    fn a_root_key_script_parses_into_its_sections_and_steps() {
        let script = Script::parse(ROOT_KEY).unwrap();
        assert_eq!(script.id(), "root-2026");
        assert_eq!(script.description(), "Root CA key for Example Corp");
        assert_eq!(
            script.quorum(),
            &Quorum {
                officers: vec!["alice".into(), "bob".into(), "carol".into()],
                required: 2
            }
        );
        let Kind::RootKey { key, certificate } = script.kind() else {
            panic!("{:?}", script.kind());
        };
        assert_eq!(key.name, "root-ca");
        assert_eq!(key.algorithm.api_name(), "EC_SIGN_P384_SHA384");
        assert_eq!(key.spec(), KeySpec::EcP384);
        assert!(key.backup);
        assert_eq!(
            certificate,
            &Some(CertificateSection {
                common_name: "Example Root CA".into(),
                organization: Some("Example Corp".into()),
                validity_days: 3650
            })
        );
        assert_eq!(
            names(&script),
            ["sign-in", "generate", "certificate", "confirm", "commit"]
        );

        let without_certificate = ROOT_KEY.split("[certificate]").next().unwrap().to_owned();
        let script = Script::parse(&without_certificate).unwrap();
        assert_eq!(names(&script), ["sign-in", "generate", "confirm", "commit"]);
    }

    #[test]
    fn a_kek_generate_script_parses_with_backup_defaulting_to_true() {
        let script = Script::parse(KEK_GENERATE).unwrap();
        let Kind::Kek {
            key,
            mode: KekMode::Generate { shares },
        } = script.kind()
        else {
            panic!("{:?}", script.kind());
        };
        assert!(key.backup);
        assert_eq!(key.spec(), KeySpec::Aes256);
        assert_eq!(shares.threshold, 2);
        assert_eq!(shares.custodians, ["alice", "bob", "carol"]);
        assert!(shares.encrypt_to_officer_keys);
        assert_eq!(
            names(&script),
            [
                "sign-in",
                "backup-kek",
                "distribute-shares",
                "generate",
                "backup",
                "confirm",
                "commit"
            ]
        );
    }

    #[test]
    fn a_kek_components_script_parses() {
        let script = Script::parse(KEK_COMPONENTS).unwrap();
        let Kind::Kek {
            key,
            mode: KekMode::Components { custodians },
        } = script.kind()
        else {
            panic!("{:?}", script.kind());
        };
        assert!(!key.backup);
        assert_eq!(custodians, &["dave", "erin", "frank"]);
        assert_eq!(
            names(&script),
            ["sign-in", "components", "import", "confirm", "commit"]
        );
        // backup defaults to false in this mode.
        let script = Script::parse(&KEK_COMPONENTS.replace("backup = false\n", "")).unwrap();
        assert!(matches!(script.kind(), Kind::Kek { key, .. } if !key.backup));
    }

    #[test]
    fn a_restore_script_parses_and_a_drill_ends_by_destroying_the_scratch_keys() {
        let script = Script::parse(RESTORE).unwrap();
        let Kind::Restore {
            bundle,
            bundle_sha256,
            drill,
            custodians,
        } = script.kind()
        else {
            panic!("{:?}", script.kind());
        };
        assert_eq!(bundle, Path::new("backups/backup.json"));
        assert_eq!(bundle_sha256[..4], [0x00, 0x11, 0x22, 0x33]);
        assert!(*drill);
        assert_eq!(custodians.len(), 3);
        assert_eq!(
            names(&script),
            [
                "sign-in",
                "submit-shares",
                "rebuild-kek",
                "unwrap",
                "verify",
                "destroy-scratch"
            ]
        );
        let real = Script::parse(&RESTORE.replace("drill = true", "drill = false")).unwrap();
        assert_eq!(names(&real).last(), Some(&"commit"));
    }

    /// Each rule, broken once: (script, edit, field the error must name).
    #[test]
    fn every_rule_is_refused_with_an_error_naming_its_field() {
        let cases: &[(&str, &str, &str, &str)] = &[
            // (base, replace this, with this, field)
            (ROOT_KEY, "format = 1", "format = 2", "format"),
            (ROOT_KEY, "format = 1\n", "", "format"),
            (ROOT_KEY, "id = \"root-2026\"", "id = \"Root-2026\"", "id"),
            (ROOT_KEY, "id = \"root-2026\"", "id = \"2026-root\"", "id"),
            (ROOT_KEY, "id = \"root-2026\"", "id = \"root_2026\"", "id"),
            (ROOT_KEY, "id = \"root-2026\"", "id = \"\"", "id"),
            (
                ROOT_KEY,
                "id = \"root-2026\"",
                "id = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"",
                "id",
            ),
            (ROOT_KEY, "id = \"root-2026\"\n", "", "id"),
            (
                ROOT_KEY,
                "kind = \"root-key\"",
                "kind = \"rootkey\"",
                "kind",
            ),
            (ROOT_KEY, "kind = \"root-key\"\n", "", "kind"),
            (
                ROOT_KEY,
                "description = \"Root CA key for Example Corp\"",
                "description = \"\"",
                "description",
            ),
            (
                ROOT_KEY,
                "description = \"Root CA key for Example Corp\"",
                "description = \"   \"",
                "description",
            ),
            (
                ROOT_KEY,
                "description = \"Root CA key for Example Corp\"",
                &format!("description = \"{}\"", "x".repeat(501)),
                "description",
            ),
            (
                ROOT_KEY,
                "description = \"Root CA key for Example Corp\"",
                "description = \"Root CA\\u001b[2J\"",
                "description",
            ),
            (
                ROOT_KEY,
                "[quorum]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n",
                "",
                "quorum",
            ),
            (
                ROOT_KEY,
                "officers = [\"alice\", \"bob\", \"carol\"]",
                "officers = [\"alice\"]",
                "quorum.officers",
            ),
            (
                ROOT_KEY,
                "officers = [\"alice\", \"bob\", \"carol\"]",
                "officers = [\"alice\", \"bob\", \"alice\"]",
                "quorum.officers",
            ),
            (
                ROOT_KEY,
                "officers = [\"alice\", \"bob\", \"carol\"]",
                "officers = [\"alice\", \"Bob\", \"carol\"]",
                "quorum.officers",
            ),
            (
                ROOT_KEY,
                "officers = [\"alice\", \"bob\", \"carol\"]",
                &format!(
                    "officers = [{}]",
                    (0..17)
                        .map(|i| format!("\"o{i}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "quorum.officers",
            ),
            (
                ROOT_KEY,
                "officers = [\"alice\", \"bob\", \"carol\"]",
                &format!("officers = [\"alice\", \"{}\"]", "b".repeat(65)),
                "quorum.officers",
            ),
            (ROOT_KEY, "required = 2", "required = 4", "quorum.required"),
            (ROOT_KEY, "required = 2", "required = 1", "quorum.required"),
            (ROOT_KEY, "required = 2", "required = -1", "quorum.required"),
            (ROOT_KEY, "required = 2\n", "", "quorum.required"),
            (
                ROOT_KEY,
                "[key]\nname = \"root-ca\"\nalgorithm = \"EC_SIGN_P384_SHA384\"\nbackup = true\n",
                "",
                "key",
            ),
            (
                ROOT_KEY,
                "name = \"root-ca\"",
                "name = \"Root-CA\"",
                "key.name",
            ),
            (
                ROOT_KEY,
                "name = \"root-ca\"",
                "name = \"1root\"",
                "key.name",
            ),
            (ROOT_KEY, "name = \"root-ca\"\n", "", "key.name"),
            (
                ROOT_KEY,
                "EC_SIGN_P384_SHA384",
                "EC_SIGN_P384",
                "key.algorithm",
            ),
            (
                ROOT_KEY,
                "EC_SIGN_P384_SHA384",
                "AES_256_GCM",
                "key.algorithm",
            ),
            (
                ROOT_KEY,
                "algorithm = \"EC_SIGN_P384_SHA384\"\n",
                "",
                "key.algorithm",
            ),
            (ROOT_KEY, "backup = true\n", "", "key.backup"),
            (
                ROOT_KEY,
                "EC_SIGN_P384_SHA384",
                "EC_SIGN_ED25519",
                "key.backup",
            ),
            (
                ROOT_KEY,
                "common_name = \"Example Root CA\"",
                "common_name = \"\"",
                "certificate.common_name",
            ),
            (
                ROOT_KEY,
                "common_name = \"Example Root CA\"",
                &format!("common_name = \"{}\"", "c".repeat(65)),
                "certificate.common_name",
            ),
            (
                ROOT_KEY,
                "common_name = \"Example Root CA\"\n",
                "",
                "certificate.common_name",
            ),
            (
                ROOT_KEY,
                "organization = \"Example Corp\"",
                &format!("organization = \"{}\"", "o".repeat(65)),
                "certificate.organization",
            ),
            (
                ROOT_KEY,
                "validity_days = 3650",
                "validity_days = 0",
                "certificate.validity_days",
            ),
            (
                ROOT_KEY,
                "validity_days = 3650",
                "validity_days = 9126",
                "certificate.validity_days",
            ),
            (
                ROOT_KEY,
                "validity_days = 3650\n",
                "",
                "certificate.validity_days",
            ),
            (
                ROOT_KEY,
                "[certificate]",
                "[kek]\nmode = \"generate\"\n[certificate]",
                "kek",
            ),
            (
                ROOT_KEY,
                "[certificate]",
                "[shares]\nthreshold = 2\ncustodians = [\"a\", \"b\"]\n[certificate]",
                "shares",
            ),
            (
                ROOT_KEY,
                "[certificate]",
                "[components]\ncustodians = [\"a\", \"b\"]\n[certificate]",
                "components",
            ),
            (
                ROOT_KEY,
                "[certificate]",
                "[restore]\ndrill = true\n[certificate]",
                "restore",
            ),
            (
                KEK_GENERATE,
                "algorithm = \"AES_256_GCM\"",
                "algorithm = \"EC_SIGN_P256_SHA256\"",
                "key.algorithm",
            ),
            (
                KEK_GENERATE,
                "algorithm = \"AES_256_GCM\"",
                "algorithm = \"AES_256_GCM\"\nbackup = false",
                "key.backup",
            ),
            (
                KEK_GENERATE,
                "[kek]",
                "[certificate]\ncommon_name = \"x\"\nvalidity_days = 1\n[kek]",
                "certificate",
            ),
            (KEK_GENERATE, "[kek]\nmode = \"generate\"\n", "", "kek"),
            (
                KEK_GENERATE,
                "mode = \"generate\"",
                "mode = \"random\"",
                "kek.mode",
            ),
            (KEK_GENERATE, "mode = \"generate\"\n", "", "kek.mode"),
            (
                KEK_GENERATE,
                "[shares]\nthreshold = 2\ncustodians = [\"alice\", \"bob\", \"carol\"]\nencrypt_to_officer_keys = true\n",
                "",
                "shares",
            ),
            (
                KEK_GENERATE,
                "[shares]",
                "[components]\ncustodians = [\"a\", \"b\"]\n[shares]",
                "components",
            ),
            (
                KEK_GENERATE,
                "threshold = 2",
                "threshold = 1",
                "shares.threshold",
            ),
            (
                KEK_GENERATE,
                "threshold = 2",
                "threshold = 4",
                "shares.threshold",
            ),
            (KEK_GENERATE, "threshold = 2\n", "", "shares.threshold"),
            (
                KEK_GENERATE,
                "custodians = [\"alice\", \"bob\", \"carol\"]",
                "custodians = [\"alice\"]",
                "shares.custodians",
            ),
            (
                KEK_GENERATE,
                "custodians = [\"alice\", \"bob\", \"carol\"]",
                "custodians = [\"alice\", \"bob\", \"bob\"]",
                "shares.custodians",
            ),
            (
                KEK_GENERATE,
                "custodians = [\"alice\", \"bob\", \"carol\"]",
                &format!(
                    "custodians = [{}]",
                    (0..100)
                        .map(|i| format!("\"c{i}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "shares.custodians",
            ),
            (
                KEK_GENERATE,
                "custodians = [\"alice\", \"bob\", \"carol\"]\n",
                "",
                "shares.custodians",
            ),
            (
                KEK_COMPONENTS,
                "backup = false",
                "backup = true",
                "key.backup",
            ),
            (
                KEK_COMPONENTS,
                "[components]",
                "[shares]\nthreshold = 2\ncustodians = [\"a\", \"b\"]\n[components]",
                "shares",
            ),
            (
                KEK_COMPONENTS,
                "[components]\ncustodians = [\"dave\", \"erin\", \"frank\"]\n",
                "",
                "components",
            ),
            (
                KEK_COMPONENTS,
                "custodians = [\"dave\", \"erin\", \"frank\"]",
                "custodians = [\"dave\"]",
                "components.custodians",
            ),
            (
                KEK_COMPONENTS,
                "custodians = [\"dave\", \"erin\", \"frank\"]",
                "custodians = [\"dave\", \"dave\"]",
                "components.custodians",
            ),
            (
                KEK_COMPONENTS,
                "custodians = [\"dave\", \"erin\", \"frank\"]",
                &format!(
                    "custodians = [{}]",
                    (0..17)
                        .map(|i| format!("\"c{i}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "components.custodians",
            ),
            (
                RESTORE,
                "[restore]",
                "[key]\nname = \"k\"\n[restore]",
                "key",
            ),
            (
                RESTORE,
                "[restore]",
                "[certificate]\ncommon_name = \"x\"\n[restore]",
                "certificate",
            ),
            (
                RESTORE,
                "[restore]",
                "[kek]\nmode = \"generate\"\n[restore]",
                "kek",
            ),
            (
                RESTORE,
                "[restore]",
                "[shares]\nthreshold = 2\n[restore]",
                "shares",
            ),
            (
                RESTORE,
                "[restore]",
                "[components]\ncustodians = []\n[restore]",
                "components",
            ),
            (
                RESTORE,
                "[restore]\nbundle = \"backups/backup.json\"\nbundle_sha256 = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\ndrill = true\ncustodians = [\"alice\", \"bob\", \"carol\"]\n",
                "",
                "restore",
            ),
            (
                RESTORE,
                "bundle = \"backups/backup.json\"",
                "bundle = \"\"",
                "restore.bundle",
            ),
            (
                RESTORE,
                "bundle = \"backups/backup.json\"",
                "bundle = \"/etc/backup.json\"",
                "restore.bundle",
            ),
            (
                RESTORE,
                "bundle = \"backups/backup.json\"\n",
                "",
                "restore.bundle",
            ),
            (
                RESTORE,
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddee",
                "restore.bundle_sha256",
            ),
            (
                RESTORE,
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                "g0112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                "restore.bundle_sha256",
            ),
            (RESTORE, "drill = true\n", "", "restore.drill"),
            (
                RESTORE,
                "custodians = [\"alice\", \"bob\", \"carol\"]",
                "custodians = [\"alice\"]",
                "restore.custodians",
            ),
            (
                RESTORE,
                "custodians = [\"alice\", \"bob\", \"carol\"]",
                "custodians = [\"alice\", \"bob\", \"alice\"]",
                "restore.custodians",
            ),
            (
                RESTORE,
                "custodians = [\"alice\", \"bob\", \"carol\"]\n",
                "",
                "restore.custodians",
            ),
        ];
        for (base, from, to, field) in cases {
            assert!(
                base.contains(from),
                "case for {field}: {from:?} not in the script"
            );
            let text = base.replacen(from, to, 1);
            match Script::parse(&text) {
                Ok(_) => panic!("accepted, expected an error on {field}:\n{text}"),
                Err(error) => {
                    assert_eq!(error.field(), Some(*field), "{error}\n{text}");
                    let message = error.to_string();
                    assert!(message.starts_with(&format!("{field}: ")), "{message}");
                    println!("{message}");
                }
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong_and_what_is_allowed() {
        let error = Script::parse(&ROOT_KEY.replace("required = 2", "required = 4")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "quorum.required: 4 is more than the 3 officers listed"
        );
        let error = Script::parse(&ROOT_KEY.replace("kind = \"root-key\"", "kind = \"rootkey\""))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "kind: \"rootkey\" is not a kind; \"root-key\", \"kek\" or \"restore\""
        );
    }

    #[test]
    fn unknown_fields_and_sections_and_wrong_types_are_refused_with_their_line() {
        // (replace this, with this, the line it is on, what the message says)
        for (from, to, on, says) in [
            (
                "backup = true",
                "backup = true\ncolour = \"red\"",
                "colour",
                "unknown field `colour`",
            ),
            (
                "[quorum]",
                "[quorum]\nminimum = 2",
                "minimum",
                "unknown field `minimum`",
            ),
            (
                "[key]",
                "[extra]\nx = 1\n[key]",
                "[extra]",
                "unknown field `extra`",
            ),
            (
                "format = 1",
                "format = 1\nversion = 1",
                "version",
                "unknown field `version`",
            ),
            ("required = 2", "required = \"2\"", "required", "string"),
            ("backup = true", "backup = \"yes\"", "backup", "string"),
        ] {
            let text = ROOT_KEY.replacen(from, to, 1);
            let error = Script::parse(&text).unwrap_err();
            let ScriptError::Syntax { line, message } = &error else {
                panic!("{error}");
            };
            assert!(message.contains(says), "{message}");
            let expected = text.lines().position(|l| l.starts_with(on)).unwrap() + 1;
            assert_eq!(*line, expected, "{error}");
        }
        let error = Script::parse("format = 1\nid = ").unwrap_err();
        assert!(
            matches!(error, ScriptError::Syntax { line: 2, .. }),
            "{error}"
        );
    }

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

    #[test]
    fn the_example_scripts_in_deploy_are_valid() {
        let root = Script::parse(include_str!(
            "../../../../../deploy/ceremonies/root-key.toml"
        ))
        .unwrap();
        let Kind::RootKey {
            key,
            certificate: Some(certificate),
        } = root.kind()
        else {
            panic!("{:?}", root.kind());
        };
        assert_eq!(key.name, "root-ca");
        assert_eq!(key.algorithm.api_name(), "EC_SIGN_P384_SHA384");
        assert!(key.backup);
        assert_eq!(certificate.common_name, "Custody Demo Root CA");
        assert_eq!(root.quorum().required, 2);

        let kek = Script::parse(include_str!("../../../../../deploy/ceremonies/kek.toml")).unwrap();
        let Kind::Kek {
            key,
            mode: KekMode::Generate { shares },
        } = kek.kind()
        else {
            panic!("{:?}", kek.kind());
        };
        assert_eq!(key.name, "demo-kek");
        assert_eq!(key.algorithm.api_name(), "AES_256_GCM");
        assert_eq!(shares.threshold, 2);
        assert_eq!(shares.custodians, ["alice", "bob", "carol"]);
    }
}
