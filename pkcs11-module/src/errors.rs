//! The one map from custody's refusals (gRPC code and `ErrorInfo` reason,
//! docs/api.md "Errors") to PKCS#11 return values. docs/api.md "PKCS#11
//! module" holds the same table; a reason not named here falls back on its
//! gRPC code.

use cryptoki_sys::{
    CK_RV, CKR_DATA_INVALID, CKR_DATA_LEN_RANGE, CKR_DEVICE_ERROR, CKR_DEVICE_MEMORY,
    CKR_FUNCTION_FAILED, CKR_FUNCTION_NOT_SUPPORTED, CKR_FUNCTION_REJECTED,
    CKR_KEY_FUNCTION_NOT_PERMITTED, CKR_KEY_HANDLE_INVALID, CKR_MECHANISM_INVALID,
};
pub use custody_proto::reason;
use tonic::Code;

/// The PKCS#11 return value for custody's refusal `status`.
pub fn ckr(status: &tonic::Status) -> CK_RV {
    ckr_of(status.code(), &reason(status))
}

/// The PKCS#11 return value for gRPC `code` with custody reason `reason`.
pub fn ckr_of(code: Code, reason: &str) -> CK_RV {
    match reason {
        // Officers must approve this use: the caller requests an operation.
        "QUORUM_REQUIRED" => CKR_FUNCTION_REJECTED,
        // The caller's certificate may not use this key (or at all).
        "NOT_ALLOWED_SIGNER" | "ROLE_REQUIRED" | "NO_CUSTODY_IDENTITY" => {
            CKR_KEY_FUNCTION_NOT_PERMITTED
        }
        // The version's lifecycle forbids the use.
        "VERSION_NOT_ACTIVE"
        | "VERSION_NOT_USABLE"
        | "CRYPTOPERIOD_ENDED"
        | "BELOW_MIN_VERSION"
        | "DESTROY_SCHEDULED"
        | "ALREADY_DESTROYED"
        | "ALGORITHM_NOT_ALLOWED"
        | "WRONG_PURPOSE"
        | "HSM_NOT_PERMITTED" => CKR_KEY_FUNCTION_NOT_PERMITTED,
        // The key or version is gone.
        "NOT_FOUND" | "HSM_KEY_MISSING" => CKR_KEY_HANDLE_INVALID,
        "DIGEST_LENGTH" | "DATA_TOO_LARGE" | "TOO_LARGE" => CKR_DATA_LEN_RANGE,
        "DIGEST_ALGORITHM_MISMATCH" | "DIGEST_NOT_ACCEPTED" | "HSM_INVALID_INPUT" => {
            CKR_DATA_INVALID
        }
        "HSM_UNSUPPORTED" => CKR_MECHANISM_INVALID,
        // A cap on work at once (HSM_BUSY, ...): try again later.
        _ if code == Code::ResourceExhausted => CKR_DEVICE_MEMORY,
        _ => match code {
            Code::Unauthenticated | Code::Unavailable | Code::DeadlineExceeded => CKR_DEVICE_ERROR,
            Code::PermissionDenied => CKR_KEY_FUNCTION_NOT_PERMITTED,
            Code::NotFound => CKR_KEY_HANDLE_INVALID,
            Code::InvalidArgument => CKR_DATA_INVALID,
            Code::Unimplemented => CKR_FUNCTION_NOT_SUPPORTED,
            _ => CKR_FUNCTION_FAILED,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_is_rejected_and_unknown_reasons_fall_back_on_the_code() {
        assert_eq!(
            ckr_of(Code::FailedPrecondition, "QUORUM_REQUIRED"),
            CKR_FUNCTION_REJECTED
        );
        assert_eq!(
            ckr_of(Code::PermissionDenied, "SOMETHING_NEW"),
            CKR_KEY_FUNCTION_NOT_PERMITTED
        );
        assert_eq!(ckr_of(Code::Unavailable, ""), CKR_DEVICE_ERROR);
        assert_eq!(ckr_of(Code::Internal, "INTERNAL"), CKR_FUNCTION_FAILED);
        assert_eq!(
            ckr_of(Code::ResourceExhausted, "HSM_BUSY"),
            CKR_DEVICE_MEMORY
        );
    }

    /// docs/api.md's table of the module's errors says what this map does:
    /// every reason it names maps to the CKR it gives, and every reason it
    /// names is one of custody's (listed in the reasons table).
    #[test]
    fn the_documented_table_is_the_map() {
        let docs = include_str!("../../docs/api.md");
        let reasons = docs
            .split("| reason | code | meaning |")
            .nth(1)
            .expect("docs/api.md has the reasons table");
        let table = docs
            .split("| custody reason (or gRPC code) | CKR |")
            .nth(1)
            .expect("docs/api.md has the PKCS#11 error table");
        let ckr_value = |name: &str| match name {
            "CKR_FUNCTION_REJECTED" => CKR_FUNCTION_REJECTED,
            "CKR_KEY_FUNCTION_NOT_PERMITTED" => CKR_KEY_FUNCTION_NOT_PERMITTED,
            "CKR_KEY_HANDLE_INVALID" => CKR_KEY_HANDLE_INVALID,
            "CKR_DATA_LEN_RANGE" => CKR_DATA_LEN_RANGE,
            "CKR_DATA_INVALID" => CKR_DATA_INVALID,
            "CKR_MECHANISM_INVALID" => CKR_MECHANISM_INVALID,
            other => panic!("the test does not know {other}"),
        };
        let mut checked = 0;
        for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells[0].contains("other") || cells[0].contains("any") {
                continue;
            }
            let ckr = cells[1]
                .split(['`', ';', ' '])
                .find(|w| w.starts_with("CKR_"))
                .expect("a CKR code");
            for reason in cells[0].split(',').map(|r| r.trim().trim_matches('`')) {
                assert!(
                    reasons.contains(&format!("`{reason}`")),
                    "{reason} is no custody reason"
                );
                assert_eq!(
                    ckr_of(Code::FailedPrecondition, reason),
                    ckr_value(ckr),
                    "{reason}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 20, "{checked} reasons checked");
    }
}
