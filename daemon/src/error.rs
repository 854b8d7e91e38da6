//! Errors of the service, and the one place they become gRPC statuses.
//!
//! Every refusal carries a stable machine-readable reason in a
//! `google.rpc.ErrorInfo` (domain `custody.dev`); `docs/api.md` lists them.
//! HSM errors are mapped from their `ErrorKind` exhaustively; anything
//! unexpected is `INTERNAL` and logged with its full cause, never shown.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The error domain in `ErrorInfo`.
pub const DOMAIN: &str = "custody.dev";

/// A refusal or failure, with its status code and stable reason.
#[derive(Debug, Clone)]
pub struct ServiceError {
    /// gRPC code.
    pub code: Code,
    /// Stable reason (UPPER_SNAKE_CASE).
    pub reason: &'static str,
    /// Human-readable message, safe to show the caller.
    pub message: String,
}

impl ServiceError {
    /// A new error.
    pub fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    /// `INVALID_ARGUMENT`.
    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, reason, message)
    }

    /// `PERMISSION_DENIED`.
    pub fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, reason, message)
    }

    /// `NOT_FOUND`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, "NOT_FOUND", message)
    }

    /// `FAILED_PRECONDITION`.
    pub fn precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, reason, message)
    }

    /// The audit log could not record: the operation did not happen.
    pub fn audit_unavailable(error: &crate::audit::AuditError) -> Self {
        tracing::error!(%error, "refusing: audit record not durable");
        Self::new(
            Code::Unavailable,
            "AUDIT_UNAVAILABLE",
            "the audit log cannot record this operation, so it was not performed",
        )
    }

    /// The gRPC status, with `ErrorInfo`.
    pub fn to_status(&self) -> Status {
        let details = ErrorDetails::with_error_info(
            self.reason,
            DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        );
        Status::with_error_details(self.code, self.message.clone(), details)
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Status {
        error.to_status()
    }
}

impl From<hsm_shim::HsmError> for ServiceError {
    fn from(error: hsm_shim::HsmError) -> Self {
        use hsm_shim::ErrorKind as K;
        let (code, reason, message) = match error.kind() {
            K::InvalidInput => (
                Code::InvalidArgument,
                "HSM_INVALID_INPUT",
                error.to_string(),
            ),
            K::NotFound => (
                Code::FailedPrecondition,
                "HSM_KEY_MISSING",
                "the key is in the registry but not in the HSM (drift)".to_string(),
            ),
            K::AlreadyExists => (Code::AlreadyExists, "HSM_KEY_EXISTS", error.to_string()),
            K::NotPermitted => (
                Code::FailedPrecondition,
                "HSM_NOT_PERMITTED",
                "the key's HSM attributes forbid this operation".to_string(),
            ),
            K::Authentication => (
                Code::Unavailable,
                "HSM_LOGIN_FAILED",
                "the HSM refused our login".to_string(),
            ),
            K::Unavailable => (
                Code::Unavailable,
                "HSM_UNAVAILABLE",
                "the HSM is unavailable".to_string(),
            ),
            K::IntegrityFailure => (
                Code::InvalidArgument,
                "INTEGRITY_FAILURE",
                error.to_string(),
            ),
            K::SelfTestFailed => (
                Code::Internal,
                "HSM_SELF_TEST_FAILED",
                "the new key failed its consistency test and was destroyed".to_string(),
            ),
            K::Unsupported => (Code::Unimplemented, "HSM_UNSUPPORTED", error.to_string()),
            K::Configuration | K::Internal | _ => {
                (Code::Internal, "INTERNAL", "internal error".to_string())
            }
        };
        if code == Code::Internal || code == Code::Unavailable {
            tracing::error!(%error, "HSM failure");
        }
        Self::new(code, reason, message)
    }
}
