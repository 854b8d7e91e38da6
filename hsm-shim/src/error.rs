//! Errors of the HSM boundary.
//!
//! An [`HsmError`] keeps the full story for logs (what we were doing, and for a
//! PKCS#11 failure the C function and the `CKR_*` code), plus one small, `Copy`
//! [`ErrorKind`] that callers branch on. The daemon maps `ErrorKind` to a gRPC
//! status in exactly one place; nothing else should need to look inside.

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, RvError};

/// What kind of failure happened, independent of how it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller asked for something malformed: a digest of the wrong length, an
    /// algorithm that does not fit the key, a label we do not accept.
    InvalidInput,
    /// No object with that label and class is on the token (or it went
    /// while being used: another process destroyed it).
    NotFound,
    /// An object with that label and class already exists.
    AlreadyExists,
    /// The key's own attributes refuse the operation (for example a
    /// non-extractable key asked to be wrapped).
    NotPermitted,
    /// Logging in to the token failed: wrong or locked PIN.
    Authentication,
    /// The token or the module is unreachable after bounded retries: device error,
    /// token removed, session lost and not recoverable.
    Unavailable,
    /// Data failed its integrity check: a tampered wrapped key, a GCM tag that does
    /// not verify, a signature that does not verify.
    IntegrityFailure,
    /// A freshly generated key pair failed its pair-wise consistency test and was
    /// destroyed.
    SelfTestFailed,
    /// The module does not support the mechanism or attribute we need.
    Unsupported,
    /// Configuration is wrong: module not loadable, token not found, PIN source
    /// unreadable.
    Configuration,
    /// An HSM call passed its deadline (`HsmConfig::call_timeout`): the HSM
    /// did not answer in time. The worker making it was abandoned and
    /// replaced; whether the call had an effect on the token is unknown, as
    /// after a crash during it.
    Timeout,
    /// Too many jobs are waiting for a worker ([`crate::Hsm::try_run`]): nothing
    /// was done; try again shortly.
    Busy,
    /// Anything else; always a bug or an unexpected module answer.
    Internal,
}

/// A failure at the HSM boundary.
#[derive(Debug, thiserror::Error)]
#[error("{context}{}", pkcs11_suffix(source.as_ref()))]
pub struct HsmError {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<CryptokiError>,
}

/// Result type of the HSM boundary.
pub type Result<T, E = HsmError> = std::result::Result<T, E>;

impl HsmError {
    /// An error of `kind` with a human-readable context and no PKCS#11 cause.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by a failed cryptoki call; the kind comes from the CKR code.
    pub(crate) fn from_cryptoki(context: impl Into<String>, source: CryptokiError) -> Self {
        Self {
            kind: kind_of(&source),
            context: context.into(),
            source: Some(source),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The PKCS#11 function and return value, when a PKCS#11 call failed.
    pub fn pkcs11_cause(&self) -> Option<(Function, RvError)> {
        match &self.source {
            Some(CryptokiError::Pkcs11(rv, function)) => Some((*function, *rv)),
            _ => None,
        }
    }

    /// The return value of the failed PKCS#11 call, if any.
    pub(crate) fn rv(&self) -> Option<RvError> {
        self.pkcs11_cause().map(|(_, rv)| rv)
    }
}

/// " (C_Sign returned CKR_DEVICE_ERROR)": the short form of a PKCS#11 cause for
/// one-line logs; cryptoki's own `Display` is a paragraph from the standard.
fn pkcs11_suffix(source: Option<&CryptokiError>) -> String {
    match source {
        Some(CryptokiError::Pkcs11(rv, function)) => {
            format!(" (C_{function:?} returned {})", ckr_name(*rv))
        }
        Some(other) => format!(" ({other})"),
        None => String::new(),
    }
}

/// `RvError::DeviceError` as the `CKR_DEVICE_ERROR` an HSM vendor's manual uses.
fn ckr_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut name = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The single map from a cryptoki error to our kind. Unknown codes are `Internal`
/// so that a surprise is never reported as the caller's fault.
fn kind_of(error: &CryptokiError) -> ErrorKind {
    let CryptokiError::Pkcs11(rv, _) = error else {
        return match error {
            CryptokiError::LibraryLoading(_) | CryptokiError::MissingSymbol(_) => {
                ErrorKind::Configuration
            }
            CryptokiError::NotSupported => ErrorKind::Unsupported,
            _ => ErrorKind::Internal,
        };
    };
    match rv {
        RvError::PinIncorrect
        | RvError::PinLocked
        | RvError::PinExpired
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::UserPinNotInitialized => ErrorKind::Authentication,
        RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::SessionCount
        | RvError::UserNotLoggedIn
        | RvError::CryptokiNotInitialized
        | RvError::HostMemory => ErrorKind::Unavailable,
        RvError::KeyUnextractable
        | RvError::KeyFunctionNotPermitted
        | RvError::KeyNotWrappable
        | RvError::ActionProhibited
        | RvError::AttributeReadOnly
        | RvError::UserTypeInvalid
        | RvError::UserAnotherAlreadyLoggedIn
        | RvError::AttributeSensitive => ErrorKind::NotPermitted,
        RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange
        | RvError::WrappedKeyInvalid
        | RvError::WrappedKeyLenRange
        | RvError::SignatureInvalid
        | RvError::SignatureLenRange => ErrorKind::IntegrityFailure,
        RvError::DataLenRange
        | RvError::DataInvalid
        | RvError::ArgumentsBad
        | RvError::MechanismParamInvalid
        | RvError::KeyTypeInconsistent
        | RvError::KeySizeRange
        | RvError::TemplateInconsistent
        | RvError::TemplateIncomplete
        | RvError::AttributeValueInvalid => ErrorKind::InvalidInput,
        RvError::MechanismInvalid
        | RvError::AttributeTypeInvalid
        | RvError::FunctionNotSupported => ErrorKind::Unsupported,
        // A handle whose object is gone (another process destroyed it):
        // nothing about the data, so never an integrity failure.
        RvError::ObjectHandleInvalid
        | RvError::KeyHandleInvalid
        | RvError::WrappingKeyHandleInvalid
        | RvError::UnwrappingKeyHandleInvalid => ErrorKind::NotFound,
        _ => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ckr_codes_map_to_the_kind_a_caller_acts_on() {
        let cases = [
            (RvError::PinIncorrect, ErrorKind::Authentication),
            (RvError::DeviceError, ErrorKind::Unavailable),
            (RvError::SessionHandleInvalid, ErrorKind::Unavailable),
            (RvError::KeyUnextractable, ErrorKind::NotPermitted),
            (RvError::EncryptedDataInvalid, ErrorKind::IntegrityFailure),
            (RvError::WrappedKeyInvalid, ErrorKind::IntegrityFailure),
            (RvError::SignatureInvalid, ErrorKind::IntegrityFailure),
            (RvError::ObjectHandleInvalid, ErrorKind::NotFound),
            (RvError::WrappingKeyHandleInvalid, ErrorKind::NotFound),
            (RvError::UnwrappingKeyHandleInvalid, ErrorKind::NotFound),
            (RvError::DataLenRange, ErrorKind::InvalidInput),
            (RvError::MechanismInvalid, ErrorKind::Unsupported),
            (RvError::GeneralError, ErrorKind::Internal),
        ];
        for (rv, kind) in cases {
            let err = HsmError::from_cryptoki("op", CryptokiError::Pkcs11(rv, Function::Sign));
            assert_eq!(err.kind(), kind, "{rv:?}");
            let (function, cause) = err.pkcs11_cause().unwrap();
            assert!(matches!(function, Function::Sign));
            assert_eq!(cause, rv);
        }
    }

    #[test]
    fn display_names_the_pkcs11_function_and_ckr_code() {
        let err = HsmError::from_cryptoki(
            "signing with key ca/v1",
            CryptokiError::Pkcs11(RvError::DeviceError, Function::Sign),
        );
        assert_eq!(
            err.to_string(),
            "signing with key ca/v1 (C_Sign returned CKR_DEVICE_ERROR)"
        );
        assert!(std::error::Error::source(&err).is_some());
        let plain = HsmError::new(ErrorKind::InvalidInput, "digest is 31 bytes");
        assert_eq!(plain.to_string(), "digest is 31 bytes");
    }
}
