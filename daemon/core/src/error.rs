//! The one error vocabulary of custody: why an action was refused or failed.
//!
//! Every refusal carries a [`Reason`], a stable machine-readable name that
//! callers and the audit log see (`docs/api.md` lists them all; a test checks
//! that the table and this enum agree), and a message safe to show the
//! caller. The domain never chooses a transport status: the API layer maps
//! each reason to one in a single match. HSM errors become reasons here, from
//! their `ErrorKind`; anything unexpected is [`Reason::Internal`], logged
//! with its full cause and never shown.

use std::fmt;

macro_rules! reasons {
    ($($variant:ident = $name:literal: $doc:literal,)*) => {
        /// Why an action was refused or failed.
        #[non_exhaustive]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $(#[doc = $doc] $variant,)*
        }

        impl Reason {
            /// Every reason, in the order `docs/api.md` lists them.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The stable name (UPPER_SNAKE_CASE) callers and the audit log see.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    Unauthenticated = "UNAUTHENTICATED": "no verified TLS peer",
    NoCustodyIdentity = "NO_CUSTODY_IDENTITY": "the certificate names no custody principal",
    CertificateNoLongerValid = "CERTIFICATE_NO_LONGER_VALID": "the connection's client certificate no longer verifies (revoked by a CRL loaded since, expired, or its CA no longer trusted); the connection is closed",
    UnknownMethod = "UNKNOWN_METHOD": "no such service or method",
    MessageTooLarge = "MESSAGE_TOO_LARGE": "the request message is over max_message_bytes",
    RoleRequired = "ROLE_REQUIRED": "the caller lacks the role the RPC needs",
    NotAllowedSigner = "NOT_ALLOWED_SIGNER": "the caller is not on the key's allow-list",
    BadName = "BAD_NAME": "malformed resource name or key id",
    BadKeyId = "BAD_KEY_ID": "malformed resource name or key id",
    BadAlgorithm = "BAD_ALGORITHM": "unspecified or unknown enum value, or a value that does not fit",
    BadPurpose = "BAD_PURPOSE": "unspecified or unknown enum value, or a value that does not fit",
    BadState = "BAD_STATE": "unspecified or unknown enum value, or a value that does not fit",
    BadEncoding = "BAD_ENCODING": "unspecified or unknown enum value, or a value that does not fit",
    BadPrincipal = "BAD_PRINCIPAL": "bad allow-list",
    TooManySigners = "TOO_MANY_SIGNERS": "bad allow-list",
    BadPageSize = "BAD_PAGE_SIZE": "bad pagination",
    BadPageToken = "BAD_PAGE_TOKEN": "bad pagination",
    Undecodable = "UNDECODABLE": "the request's bytes do not decode as its protobuf message, or it carries no message, or one in a compression custodyd does not take (answered before any handler)",
    MissingInput = "MISSING_INPUT": "neither digest nor data, or an empty digest",
    DigestLength = "DIGEST_LENGTH": "the digest does not fit the key's algorithm (Ed25519 takes data only)",
    DigestAlgorithmMismatch = "DIGEST_ALGORITHM_MISMATCH": "the digest does not fit the key's algorithm (Ed25519 takes data only)",
    DigestNotAccepted = "DIGEST_NOT_ACCEPTED": "the digest does not fit the key's algorithm (Ed25519 takes data only)",
    DataTooLarge = "DATA_TOO_LARGE": "data over 64 KiB",
    ChecksumMismatch = "CHECKSUM_MISMATCH": "input_crc32c does not match",
    NotFound = "NOT_FOUND": "no such key or version",
    KeyExists = "KEY_EXISTS": "the key id is taken",
    AlgorithmNotAllowed = "ALGORITHM_NOT_ALLOWED": "the crypto policy forbids the algorithm",
    VersionNotActive = "VERSION_NOT_ACTIVE": "the version may not sign or encrypt in its state",
    VersionNotUsable = "VERSION_NOT_USABLE": "the version may not verify or decrypt in its state",
    CryptoperiodEnded = "CRYPTOPERIOD_ENDED": "the version's cryptoperiod is over: use the primary version or rotate",
    BelowMinVersion = "BELOW_MIN_VERSION": "the version is below the key's min_version",
    DestroyScheduled = "DESTROY_SCHEDULED": "destruction state",
    AlreadyScheduled = "ALREADY_SCHEDULED": "destruction state",
    NotScheduled = "NOT_SCHEDULED": "destruction state",
    AlreadyDestroyed = "ALREADY_DESTROYED": "destruction state",
    NotDue = "NOT_DUE": "the scheduled destruction is not due yet",
    ReservedByCeremony = "RESERVED_BY_CEREMONY": "a key-destruction ceremony witnesses this destruction",
    LegalHold = "LEGAL_HOLD": "a legal hold blocks destruction; there is no hold to release",
    NoLegalHold = "NO_LEGAL_HOLD": "a legal hold blocks destruction; there is no hold to release",
    IllegalTransition = "ILLEGAL_TRANSITION": "lifecycle rule",
    PrimaryVersion = "PRIMARY_VERSION": "lifecycle rule",
    ReasonRequired = "REASON_REQUIRED": "compromise and legal hold need a reason; malformed request id or cryptoperiod; an empty update",
    BadReason = "BAD_REASON": "compromise and legal hold need a reason; malformed request id or cryptoperiod; an empty update",
    BadRequestId = "BAD_REQUEST_ID": "compromise and legal hold need a reason; malformed request id or cryptoperiod; an empty update",
    BadCryptoperiod = "BAD_CRYPTOPERIOD": "compromise and legal hold need a reason; malformed request id or cryptoperiod; an empty update",
    NothingToUpdate = "NOTHING_TO_UPDATE": "compromise and legal hold need a reason; malformed request id or cryptoperiod; an empty update",
    BadMinVersion = "BAD_MIN_VERSION": "a minimum version above the primary version",
    WrongPurpose = "WRONG_PURPOSE": "a signing key asked to encrypt or the reverse; an AES key has no public key",
    NoPublicKey = "NO_PUBLIC_KEY": "a signing key asked to encrypt or the reverse; an AES key has no public key",
    BadCiphertext = "BAD_CIPHERTEXT": "not custody's ciphertext format; made by another key than the one named",
    CiphertextKeyMismatch = "CIPHERTEXT_KEY_MISMATCH": "not custody's ciphertext format; made by another key than the one named",
    IntegrityFailure = "INTEGRITY_FAILURE": "the ciphertext, its associated data or its version do not authenticate; nothing is released",
    TooLarge = "TOO_LARGE": "plaintext or associated data over 64 KiB",
    NonceBudgetExhausted = "NONCE_BUDGET_EXHAUSTED": "the version made its max_encryptions_per_version; rotate",
    HsmInvalidInput = "HSM_INVALID_INPUT": "the HSM refused the input as malformed",
    HsmKeyMissing = "HSM_KEY_MISSING": "the HSM disagrees with the registry (drift)",
    HsmKeyExists = "HSM_KEY_EXISTS": "the HSM already holds an object under the label",
    HsmNotPermitted = "HSM_NOT_PERMITTED": "the HSM disagrees with the registry (drift)",
    HsmUnsupported = "HSM_UNSUPPORTED": "the HSM does not support the mechanism",
    AuditUnavailable = "AUDIT_UNAVAILABLE": "the audit record could not be made durable, so nothing was done",
    RegistryUnavailable = "REGISTRY_UNAVAILABLE": "the key registry could not be written",
    StorageLow = "STORAGE_LOW": "the data directory is below its free-space reserve: only reads are served until space returns",
    HsmUnavailable = "HSM_UNAVAILABLE": "the HSM cannot be reached",
    HsmTimeout = "HSM_TIMEOUT": "an HSM call passed its deadline (`[hsm] call_timeout_ms`); its worker was replaced; whether the call took effect is unknown, as after a crash",
    HsmLoginFailed = "HSM_LOGIN_FAILED": "the HSM cannot be reached",
    RollbackFailed = "ROLLBACK_FAILED": "an interrupted generation could not be rolled back; custodyd retries at the next start",
    HsmSelfTestFailed = "HSM_SELF_TEST_FAILED": "a new key failed its consistency test and was destroyed",
    QuorumRequired = "QUORUM_REQUIRED": "the key (for a backup, the administrative quorum) puts this kind of call under officer approval: use RequestOperation",
    NoPolicy = "NO_POLICY": "the operation needs no approval: call the direct RPC",
    NoOfficers = "NO_OFFICERS": "no genesis was applied, so there is no administrative quorum",
    BadPolicy = "BAD_POLICY": "impossible or weak policy (M < 2, M > N, duplicates, unknown officers), malformed officer, no operation",
    BadOfficer = "BAD_OFFICER": "impossible or weak policy (M < 2, M > N, duplicates, unknown officers), malformed officer, no operation",
    MissingSpec = "MISSING_SPEC": "impossible or weak policy (M < 2, M > N, duplicates, unknown officers), malformed officer, no operation",
    OfficerExists = "OFFICER_EXISTS": "the officer id or principal is enrolled already",
    OfficerRemovalRefused = "OFFICER_REMOVAL_REFUSED": "the officer set would fall below the administrative quorum",
    OfficerNotEnrolled = "OFFICER_NOT_ENROLLED": "unknown officer id, or one bound to another certificate principal",
    OfficerMismatch = "OFFICER_MISMATCH": "unknown officer id, or one bound to another certificate principal",
    OfficerNotEligible = "OFFICER_NOT_ELIGIBLE": "the officer is not in this operation's quorum, or asked for it",
    RequesterCannotApprove = "REQUESTER_CANNOT_APPROVE": "the officer is not in this operation's quorum, or asked for it",
    BadApprovalSignature = "BAD_APPROVAL_SIGNATURE": "the signature does not verify over this operation's digest with the officer's key",
    AlreadyVoted = "ALREADY_VOTED": "one vote per officer; decided or expired operations take no votes",
    OperationNotPending = "OPERATION_NOT_PENDING": "one vote per officer; decided or expired operations take no votes",
    OperationExpired = "OPERATION_EXPIRED": "one vote per officer; decided or expired operations take no votes",
    NotYours = "NOT_YOURS": "only the requester, officers and auditors read an operation",
    PolicyChanged = "POLICY_CHANGED": "the quorum in force when the last approval came is not the one the operation was requested under (a policy or the officer set changed): request it again",
    StoreUnavailable = "STORE_UNAVAILABLE": "the operation store cannot be written",
    BadScript = "BAD_SCRIPT": "the script does not parse or validate (the message names the field); over 64 KiB; not ceremonies/{id}",
    ScriptTooLarge = "SCRIPT_TOO_LARGE": "the script does not parse or validate (the message names the field); over 64 KiB; not ceremonies/{id}",
    BadCeremonyName = "BAD_CEREMONY_NAME": "the script does not parse or validate (the message names the field); over 64 KiB; not ceremonies/{id}",
    CeremonyExists = "CEREMONY_EXISTS": "the ceremony id is taken; an open ceremony makes that key id",
    KeyReserved = "KEY_RESERVED": "an unfinished ceremony reserved that key id: it registers it at its commit",
    SoPinNotConfigured = "SO_PIN_NOT_CONFIGURED": "a KEK ceremony without [ceremony] so_pin_file; a drill without a scratch token; a backup before any KEK ceremony",
    NoScratchToken = "NO_SCRATCH_TOKEN": "a KEK ceremony without [ceremony] so_pin_file; a drill without a scratch token; a backup before any KEK ceremony",
    NoBackupKek = "NO_BACKUP_KEK": "a KEK ceremony without [ceremony] so_pin_file; a drill without a scratch token; a backup before any KEK ceremony",
    BackupKekCurrent = "BACKUP_KEK_CURRENT": "the backup KEK named is the current one already",
    BackupKekTooWeak = "BACKUP_KEK_TOO_WEAK": "the current backup KEK's custodians and share threshold do not cover the administrative quorum or a SIGN or DECRYPT policy of a key the backup would hold",
    BundleMismatch = "BUNDLE_MISMATCH": "the bundle sent is not the one the script pins; it does not validate; the audit key it names is neither custodyd's own nor pinned by SHA-256 in [ceremony] trusted_audit_keys or the script's restore.audit_key_sha256 (refused at open; the message gives that key's SHA-256); or its signature does not verify",
    BadBundle = "BAD_BUNDLE": "the bundle sent is not the one the script pins; it does not validate; the audit key it names is neither custodyd's own nor pinned by SHA-256 in [ceremony] trusted_audit_keys or the script's restore.audit_key_sha256 (refused at open; the message gives that key's SHA-256); or its signature does not verify",
    NotInQuorum = "NOT_IN_QUORUM": "the officer is not in the script's quorum, did not sign in, is not a custodian, or has no share to collect",
    NotPresent = "NOT_PRESENT": "the officer is not in the script's quorum, did not sign in, is not a custodian, or has no share to collect",
    NotACustodian = "NOT_A_CUSTODIAN": "the officer is not in the script's quorum, did not sign in, is not a custodian, or has no share to collect",
    NoShare = "NO_SHARE": "the officer is not in the script's quorum, did not sign in, is not a custodian, or has no share to collect",
    BadSignature = "BAD_SIGNATURE": "a sign-in or confirmation that does not verify over this script (and fingerprint) with the officer's key",
    NotSigningIn = "NOT_SIGNING_IN": "the ceremony is not at that step",
    NotDistributing = "NOT_DISTRIBUTING": "the ceremony is not at that step",
    NotAccepting = "NOT_ACCEPTING": "the ceremony is not at that step",
    NotConfirming = "NOT_CONFIRMING": "the ceremony is not at that step",
    Finished = "FINISHED": "the ceremony is not at that step",
    SecretsElsewhere = "SECRETS_ELSEWHERE": "the ceremony's secrets (shares to collect, components or shares entered) are in another running replica's memory, never in the store: collect, hand in or abort there (the message names it)",
    AlreadyPresent = "ALREADY_PRESENT": "one sign-in, confirmation and secret per officer",
    AlreadyConfirmed = "ALREADY_CONFIRMED": "one sign-in, confirmation and secret per officer",
    AlreadySubmitted = "ALREADY_SUBMITTED": "one sign-in, confirmation and secret per officer",
    BadComponent = "BAD_COMPONENT": "a component that is not 32 bytes of hex (or all zero); one whose KCV is not the sheet's",
    KcvMismatch = "KCV_MISMATCH": "a component that is not 32 bytes of hex (or all zero); one whose KCV is not the sheet's",
    DuplicateComponent = "DUPLICATE_COMPONENT": "a component whose KCV is that of a component entered before in the ceremony, or of all entered so far combined (XOR would cancel them out of the key); nothing is kept, the custodian enters another",
    NoSecret = "NO_SECRET": "a ceremony step that needs a component or share got none",
    BadShare = "BAD_SHARE": "a share that fails its checksum; of another set or threshold than the bundle's; submitted twice; a set that does not rebuild the secret (the restore rolls back before any unwrap)",
    WrongShareSet = "WRONG_SHARE_SET": "a share that fails its checksum; of another set or threshold than the bundle's; submitted twice; a set that does not rebuild the secret (the restore rolls back before any unwrap)",
    DuplicateShare = "DUPLICATE_SHARE": "a share that fails its checksum; of another set or threshold than the bundle's; submitted twice; a set that does not rebuild the secret (the restore rolls back before any unwrap)",
    SharesRefused = "SHARES_REFUSED": "a share that fails its checksum; of another set or threshold than the bundle's; submitted twice; a set that does not rebuild the secret (the restore rolls back before any unwrap)",
    NotBackupExportable = "NOT_BACKUP_EXPORTABLE": "Ed25519 keys cannot be backed up on SoftHSM2; no root certificate for RSA-PSS keys",
    CertificateUnsupported = "CERTIFICATE_UNSUPPORTED": "Ed25519 keys cannot be backed up on SoftHSM2; no root certificate for RSA-PSS keys",
    CertificateLint = "CERTIFICATE_LINT": "the certificate or CRL a ceremony was about to have the HSM sign breaks a lint rule (named in the message); the HSM signed nothing",
    CertificateUnverified = "CERTIFICATE_UNVERIFIED": "the HSM's signature over a ceremony's certificate or CRL does not verify with the issuer's public key; it is not released",
    NoIssuerCertificate = "NO_ISSUER_CERTIFICATE": "an intermediate ceremony's issuer has no root certificate stored with its current version (it was not made by a root-key ceremony with a [certificate])",
    CsrMismatch = "CSR_MISMATCH": "the CSR sent with an intermediate ceremony's start is not the one the script names by SHA-256",
    BadCsr = "BAD_CSR": "the CSR sent is not a PKCS#10 certification request (PEM or DER), or its subject cannot be certified byte for byte",
    CsrSignatureInvalid = "CSR_SIGNATURE_INVALID": "the CSR's self-signature does not verify with the public key it carries",
    CsrKeyNotAllowed = "CSR_KEY_NOT_ALLOWED": "the CSR's public key is not one a subordinate CA may have (ECDSA P-256 or P-384, RSA 2048, 3072 or 4096 bits)",
    CsrIsIssuerKey = "CSR_IS_ISSUER_KEY": "the CSR carries the issuing root's own public key",
    CrossSignMismatch = "CROSS_SIGN_MISMATCH": "the certificate sent with a cross-sign ceremony's start is not the one the script names by SHA-256",
    BadCrossSignCertificate = "BAD_CROSS_SIGN_CERTIFICATE": "the certificate sent with a cross-sign ceremony's start is not an X.509 certificate (PEM or DER)",
    CrossSignNotCa = "CROSS_SIGN_NOT_CA": "the certificate to cross-sign is not a CA certificate (no basicConstraints with cA true)",
    CrossSignIsIssuerKey = "CROSS_SIGN_IS_ISSUER_KEY": "the certificate to cross-sign carries the issuing root's own public key",
    CrossSignSignatureInvalid = "CROSS_SIGN_SIGNATURE_INVALID": "the certificate to cross-sign names itself as its issuer but its signature does not verify with the public key it carries: its maker did not show they hold the key",
    CrossSignKeyNotAllowed = "CROSS_SIGN_KEY_NOT_ALLOWED": "the certificate to cross-sign carries a key a subordinate CA may not have (ECDSA P-256 or P-384, RSA 2048, 3072 or 4096 bits)",
    CrossSignSubjectChanged = "CROSS_SIGN_SUBJECT_CHANGED": "the subject of the certificate to cross-sign cannot be re-issued byte for byte",
    PromotionPoliciesConflict = "PROMOTION_POLICIES_CONFLICT": "a staged version's promotion needs both the key's ROTATE and SET_STATE policies, and neither covers the other",
    JournalUnavailable = "JOURNAL_UNAVAILABLE": "the ceremony journal cannot be written",
    JournalCorrupt = "JOURNAL_CORRUPT": "a ceremony journal record does not parse (a bug or a damaged data directory)",
    TooManyPending = "TOO_MANY_PENDING": "a cap on work one caller (or custodyd) takes on at once: retry after the hint",
    TooManyCeremonies = "TOO_MANY_CEREMONIES": "a cap on work one caller (or custodyd) takes on at once: retry after the hint",
    HsmBusy = "HSM_BUSY": "a cap on work one caller (or custodyd) takes on at once: retry after the hint",
    BadRecipient = "BAD_RECIPIENT": "a DECRYPT operation's recipient key is not an Ed25519 public key",
    Internal = "INTERNAL": "a bug; details are in the daemon's log, never in the response",
}

impl Reason {
    /// Whether the refusal says only that custody could not act right now
    /// (a store, the audit log or the HSM was unavailable), so that nothing
    /// was decided and the same step may be tried again.
    pub fn is_unavailable(self) -> bool {
        matches!(
            self,
            Reason::AuditUnavailable
                | Reason::RegistryUnavailable
                | Reason::StorageLow
                | Reason::HsmUnavailable
                | Reason::HsmTimeout
                | Reason::HsmLoginFailed
                | Reason::RollbackFailed
                | Reason::StoreUnavailable
                | Reason::JournalUnavailable
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest message an [`Error`] carries, in characters: whatever a
/// request held, the status custodyd answers with stays small (echoes of
/// the request itself are shorter still: `text::echo`).
pub const MAX_MESSAGE_CHARS: usize = 512;

/// A refusal or failure: its reason and a message safe to show the caller.
#[derive(Debug, Clone)]
pub struct Error {
    /// The stable reason.
    pub reason: Reason,
    /// Human-readable message, safe to show the caller.
    pub message: String,
    /// For a refusal that only says "not now" (a cap was reached): when
    /// trying again may succeed. The API layer sends it as
    /// `google.rpc.RetryInfo`.
    pub retry_after: Option<std::time::Duration>,
}

impl Error {
    /// A refusal for `reason`; a message over [`MAX_MESSAGE_CHARS`] is cut
    /// there, its last character an ellipsis.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.chars().count() > MAX_MESSAGE_CHARS {
            message = message.chars().take(MAX_MESSAGE_CHARS - 1).collect();
            message.push('…');
        }
        Self {
            reason,
            message,
            retry_after: None,
        }
    }

    /// The same refusal, saying when to try again.
    pub fn retry_after(mut self, delay: std::time::Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// A bug or an impossible state: the detail goes to the log only, the
    /// caller learns nothing but that it was internal.
    pub fn internal(detail: impl fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(Reason::Internal, "internal error")
    }

    /// The audit log could not record: the operation did not happen.
    pub fn audit_unavailable(error: &impl fmt::Display) -> Self {
        tracing::error!(%error, "refusing: audit record not durable");
        Self::new(
            Reason::AuditUnavailable,
            "the audit log cannot record this operation, so it was not performed",
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Error {}

/// The retry hint of [`Reason::HsmBusy`]: a full queue drains in well under
/// this at the pool's measured rates.
pub const HSM_BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// What the HSM said, in words a caller may read: never the PKCS#11
/// function, the `CKR_*` code or the HSM label in the [`hsm_shim::HsmError`]
/// (those go to the log). Callers that know which key version was involved
/// say so in API names (`keys/{id}/versions/{n}`), as envelope decryption
/// does.
impl From<hsm_shim::HsmError> for Error {
    fn from(error: hsm_shim::HsmError) -> Self {
        use hsm_shim::ErrorKind as K;
        let (reason, message) = match error.kind() {
            K::InvalidInput => (
                Reason::HsmInvalidInput,
                "the HSM refused the input as malformed",
            ),
            K::NotFound => (
                Reason::HsmKeyMissing,
                "the key is in the registry but not in the HSM (drift)",
            ),
            K::AlreadyExists => (
                Reason::HsmKeyExists,
                "the HSM already holds an object for this key version",
            ),
            K::NotPermitted => (
                Reason::HsmNotPermitted,
                "the key's HSM attributes forbid this operation",
            ),
            K::Authentication => (Reason::HsmLoginFailed, "the HSM refused our login"),
            K::Unavailable => (Reason::HsmUnavailable, "the HSM is unavailable"),
            K::Timeout => (
                Reason::HsmTimeout,
                "the HSM did not answer in time; nothing was decided: try again",
            ),
            K::IntegrityFailure => (
                Reason::IntegrityFailure,
                "the data does not authenticate under the key; nothing was released",
            ),
            K::SelfTestFailed => (
                Reason::HsmSelfTestFailed,
                "the new key failed its consistency test and was destroyed",
            ),
            K::Unsupported => (
                Reason::HsmUnsupported,
                "the HSM does not support the mechanism this needs",
            ),
            K::Busy => {
                return Self::new(
                    Reason::HsmBusy,
                    "too many requests are waiting for the HSM; nothing was done: try again shortly",
                )
                .retry_after(HSM_BUSY_RETRY);
            }
            K::Configuration | K::Internal | _ => (Reason::Internal, "internal error"),
        };
        if reason.is_unavailable()
            || reason == Reason::Internal
            || reason == Reason::HsmSelfTestFailed
        {
            tracing::error!(%error, "HSM failure");
        } else {
            tracing::warn!(%error, %reason, "HSM refusal");
        }
        Self::new(reason, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However an HSM error is worded (its function, `CKR_*` code and the
    /// label are in it), the caller's message holds none of it.
    #[test]
    fn hsm_errors_never_show_pkcs11_codes_or_labels() {
        use hsm_shim::{ErrorKind as K, HsmError};
        for kind in [
            K::InvalidInput,
            K::NotFound,
            K::AlreadyExists,
            K::NotPermitted,
            K::Authentication,
            K::Unavailable,
            K::IntegrityFailure,
            K::SelfTestFailed,
            K::Unsupported,
            K::Configuration,
            K::Internal,
        ] {
            let error = Error::from(HsmError::new(
                kind,
                "integrity check failed: decrypting with key/payments-kek/v1 \
                 (C_Decrypt returned CKR_GENERAL_ERROR)",
            ));
            for leak in ["CKR_", "C_Decrypt", "key/payments-kek", "GENERAL_ERROR"] {
                assert!(!error.message.contains(leak), "{kind:?}: {}", error.message);
            }
        }
    }

    #[test]
    fn messages_are_bounded() {
        let short = "x".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(Error::new(Reason::BadName, short.clone()).message, short);
        let cut = Error::new(Reason::BadName, "é".repeat(10_000)).message;
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn reason_names_are_unique_upper_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for reason in Reason::ALL {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
    }
}
