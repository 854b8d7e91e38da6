//! The one place a domain [`Error`] becomes a gRPC status: each [`Reason`]
//! maps to one code, and the status carries the reason in a
//! `google.rpc.ErrorInfo` (domain `custody.dev`).

use custody_core::{Error, Reason};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The error domain in `ErrorInfo` (the codec's too).
pub const DOMAIN: &str = custody_proto::ERROR_DOMAIN;

/// The gRPC code of `reason`; `None` only for a reason added to the domain
/// and not yet given a code here (a test keeps that from shipping).
fn known_code(reason: Reason) -> Option<Code> {
    use Reason as R;
    Some(match reason {
        R::Unauthenticated => Code::Unauthenticated,
        R::NoCustodyIdentity => Code::PermissionDenied,
        R::CertificateNoLongerValid => Code::Unauthenticated,
        R::UnknownMethod => Code::Unimplemented,
        R::MessageTooLarge => Code::ResourceExhausted,
        R::RoleRequired => Code::PermissionDenied,
        R::NotAllowedSigner => Code::PermissionDenied,
        R::BadName => Code::InvalidArgument,
        R::BadKeyId => Code::InvalidArgument,
        R::BadAlgorithm => Code::InvalidArgument,
        R::BadPurpose => Code::InvalidArgument,
        R::BadState => Code::InvalidArgument,
        R::BadEncoding => Code::InvalidArgument,
        R::BadPrincipal => Code::InvalidArgument,
        R::TooManySigners => Code::InvalidArgument,
        R::BadPageSize => Code::InvalidArgument,
        R::BadPageToken => Code::InvalidArgument,
        R::Undecodable => Code::InvalidArgument,
        R::MissingInput => Code::InvalidArgument,
        R::DigestLength => Code::InvalidArgument,
        R::DigestAlgorithmMismatch => Code::InvalidArgument,
        R::DigestNotAccepted => Code::InvalidArgument,
        R::DataTooLarge => Code::InvalidArgument,
        R::ChecksumMismatch => Code::InvalidArgument,
        R::NotFound => Code::NotFound,
        R::KeyExists => Code::AlreadyExists,
        R::AlgorithmNotAllowed => Code::FailedPrecondition,
        R::VersionNotActive => Code::FailedPrecondition,
        R::VersionNotUsable => Code::FailedPrecondition,
        R::CryptoperiodEnded => Code::FailedPrecondition,
        R::BelowMinVersion => Code::FailedPrecondition,
        R::DestroyScheduled => Code::FailedPrecondition,
        R::AlreadyScheduled => Code::FailedPrecondition,
        R::NotScheduled => Code::FailedPrecondition,
        R::AlreadyDestroyed => Code::FailedPrecondition,
        R::NotDue => Code::FailedPrecondition,
        R::ReservedByCeremony => Code::FailedPrecondition,
        R::LegalHold => Code::FailedPrecondition,
        R::NoLegalHold => Code::FailedPrecondition,
        R::IllegalTransition => Code::FailedPrecondition,
        R::PrimaryVersion => Code::FailedPrecondition,
        R::ReasonRequired => Code::InvalidArgument,
        R::BadReason => Code::InvalidArgument,
        R::BadRequestId => Code::InvalidArgument,
        R::BadCryptoperiod => Code::InvalidArgument,
        R::NothingToUpdate => Code::InvalidArgument,
        R::BadMinVersion => Code::FailedPrecondition,
        R::WrongPurpose => Code::FailedPrecondition,
        R::NoPublicKey => Code::FailedPrecondition,
        R::BadCiphertext => Code::InvalidArgument,
        R::CiphertextKeyMismatch => Code::InvalidArgument,
        R::IntegrityFailure => Code::InvalidArgument,
        R::TooLarge => Code::InvalidArgument,
        R::NonceBudgetExhausted => Code::FailedPrecondition,
        R::HsmInvalidInput => Code::InvalidArgument,
        R::HsmKeyMissing => Code::FailedPrecondition,
        R::HsmKeyExists => Code::AlreadyExists,
        R::HsmNotPermitted => Code::FailedPrecondition,
        R::HsmUnsupported => Code::Unimplemented,
        R::AuditUnavailable => Code::Unavailable,
        R::RegistryUnavailable => Code::Unavailable,
        R::StorageLow => Code::Unavailable,
        R::HsmUnavailable => Code::Unavailable,
        R::HsmTimeout => Code::Unavailable,
        R::HsmLoginFailed => Code::Unavailable,
        R::RollbackFailed => Code::Unavailable,
        R::HsmSelfTestFailed => Code::Internal,
        R::QuorumRequired => Code::FailedPrecondition,
        R::NoPolicy => Code::FailedPrecondition,
        R::NoOfficers => Code::FailedPrecondition,
        R::BadPolicy => Code::InvalidArgument,
        R::BadOfficer => Code::InvalidArgument,
        R::MissingSpec => Code::InvalidArgument,
        R::OfficerExists => Code::AlreadyExists,
        R::OfficerRemovalRefused => Code::FailedPrecondition,
        R::OfficerNotEnrolled => Code::PermissionDenied,
        R::OfficerMismatch => Code::PermissionDenied,
        R::OfficerNotEligible => Code::PermissionDenied,
        R::RequesterCannotApprove => Code::PermissionDenied,
        R::BadApprovalSignature => Code::InvalidArgument,
        R::AlreadyVoted => Code::FailedPrecondition,
        R::OperationNotPending => Code::FailedPrecondition,
        R::OperationExpired => Code::FailedPrecondition,
        R::NotYours => Code::PermissionDenied,
        R::PolicyChanged => Code::FailedPrecondition,
        R::StoreUnavailable => Code::Unavailable,
        R::BadScript => Code::InvalidArgument,
        R::ScriptTooLarge => Code::InvalidArgument,
        R::BadCeremonyName => Code::InvalidArgument,
        R::CeremonyExists => Code::AlreadyExists,
        R::KeyReserved => Code::AlreadyExists,
        R::SoPinNotConfigured => Code::FailedPrecondition,
        R::NoScratchToken => Code::FailedPrecondition,
        R::NoBackupKek | R::BackupKekCurrent | R::BackupKekTooWeak => Code::FailedPrecondition,
        R::BundleMismatch => Code::InvalidArgument,
        R::BadBundle => Code::InvalidArgument,
        R::NotInQuorum => Code::PermissionDenied,
        R::NotPresent => Code::PermissionDenied,
        R::NotACustodian => Code::PermissionDenied,
        R::NoShare => Code::PermissionDenied,
        R::BadSignature => Code::PermissionDenied,
        R::NotSigningIn => Code::FailedPrecondition,
        R::NotDistributing => Code::FailedPrecondition,
        R::NotAccepting => Code::FailedPrecondition,
        R::NotConfirming => Code::FailedPrecondition,
        R::Finished => Code::FailedPrecondition,
        R::SecretsElsewhere => Code::FailedPrecondition,
        R::AlreadyPresent => Code::FailedPrecondition,
        R::AlreadyConfirmed => Code::FailedPrecondition,
        R::AlreadySubmitted => Code::FailedPrecondition,
        R::BadComponent => Code::InvalidArgument,
        R::KcvMismatch => Code::InvalidArgument,
        R::DuplicateComponent => Code::InvalidArgument,
        R::NoSecret => Code::InvalidArgument,
        R::BadShare => Code::InvalidArgument,
        R::WrongShareSet => Code::InvalidArgument,
        R::DuplicateShare => Code::InvalidArgument,
        R::SharesRefused => Code::InvalidArgument,
        R::NotBackupExportable => Code::InvalidArgument,
        R::CertificateUnsupported => Code::InvalidArgument,
        R::CertificateLint => Code::InvalidArgument,
        R::CertificateUnverified => Code::Internal,
        R::NoIssuerCertificate => Code::FailedPrecondition,
        R::CsrMismatch => Code::InvalidArgument,
        R::BadCsr => Code::InvalidArgument,
        R::CsrSignatureInvalid => Code::InvalidArgument,
        R::CsrKeyNotAllowed => Code::InvalidArgument,
        R::CsrIsIssuerKey => Code::InvalidArgument,
        R::CrossSignMismatch => Code::InvalidArgument,
        R::BadCrossSignCertificate => Code::InvalidArgument,
        R::CrossSignNotCa => Code::InvalidArgument,
        R::CrossSignIsIssuerKey => Code::InvalidArgument,
        R::CrossSignKeyNotAllowed => Code::InvalidArgument,
        R::CrossSignSignatureInvalid => Code::InvalidArgument,
        R::CrossSignSubjectChanged => Code::InvalidArgument,
        R::PromotionPoliciesConflict => Code::FailedPrecondition,
        R::JournalUnavailable => Code::Unavailable,
        R::JournalCorrupt => Code::Internal,
        R::TooManyPending => Code::ResourceExhausted,
        R::TooManyCeremonies => Code::ResourceExhausted,
        R::HsmBusy => Code::ResourceExhausted,
        R::BadRecipient => Code::InvalidArgument,
        R::Internal => Code::Internal,
        _ => return None,
    })
}

/// The gRPC code of `reason`.
pub fn code(reason: Reason) -> Code {
    known_code(reason).unwrap_or_else(|| {
        tracing::error!(%reason, "a reason without a gRPC code; answering INTERNAL");
        Code::Internal
    })
}

/// The gRPC status of `error`, with `ErrorInfo`, and `RetryInfo` when the
/// refusal says when to try again.
pub fn to_status(error: Error) -> Status {
    let mut details = ErrorDetails::with_error_info(
        error.reason.as_str(),
        DOMAIN,
        std::collections::HashMap::<String, String>::new(),
    );
    if let Some(delay) = error.retry_after {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code(error.reason), error.message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_code() {
        for reason in Reason::ALL {
            assert!(known_code(*reason).is_some(), "{reason} has no gRPC code");
        }
    }

    /// The codec refuses undecodable messages before any handler runs, so
    /// it builds its status itself: the same code, reason and domain this
    /// map gives `Reason::Undecodable`.
    #[test]
    fn the_codec_refuses_undecodable_messages_as_this_map_does() {
        use tonic_types::StatusExt;
        let error = <custody_proto::v1::GetKeyRequest as prost::Message>::decode(&[0x0a, 0x05][..])
            .expect_err("a truncated message");
        let codec = custody_proto::codec::undecodable(&error);
        let ours = to_status(Error::new(Reason::Undecodable, error.to_string()));
        assert_eq!(codec.code(), ours.code());
        let (theirs, ours) = (
            codec
                .get_error_details()
                .error_info()
                .cloned()
                .expect("ErrorInfo"),
            ours.get_error_details()
                .error_info()
                .cloned()
                .expect("ErrorInfo"),
        );
        assert_eq!(theirs.reason, ours.reason);
        assert_eq!(theirs.domain, ours.domain);
        assert_eq!(
            Reason::Undecodable.as_str(),
            custody_proto::codec::UNDECODABLE
        );
    }

    /// `docs/api.md` lists exactly the reasons custody answers with, no
    /// more and no fewer.
    #[test]
    fn api_docs_list_exactly_the_reasons() {
        let docs = include_str!("../../docs/api.md");
        let table = docs
            .split("| reason | code | meaning |")
            .nth(1)
            .expect("docs/api.md has the reasons table");
        let mut documented = std::collections::BTreeMap::new();
        for line in table
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with('|'))
            .filter(|l| !l.starts_with("|---"))
        {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            for name in cells[0].split(',') {
                let name = name.trim().trim_matches('`');
                documented.insert(name.to_string(), cells[1].to_string());
            }
        }
        let ours: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        let theirs: std::collections::BTreeSet<&str> =
            documented.keys().map(String::as_str).collect();
        assert_eq!(
            ours.difference(&theirs).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "reasons missing from docs/api.md"
        );
        assert_eq!(
            theirs.difference(&ours).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "docs/api.md lists reasons custody does not have"
        );
        for reason in Reason::ALL {
            let wire = format!("{:?}", code(*reason));
            let documented = documented[reason.as_str()].replace('_', "").to_lowercase();
            let documented = documented.split_whitespace().next().unwrap_or_default();
            assert_eq!(
                wire.to_lowercase(),
                documented,
                "docs/api.md gives {reason} another code"
            );
        }
    }
}
