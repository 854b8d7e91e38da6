//! Recovery from lost sessions, device errors, logouts and stale handles.
//!
//! SoftHSM2 cannot produce `CKR_DEVICE_ERROR` or `CKR_TOKEN_NOT_PRESENT` on
//! demand, so those are injected at the PKCS#11 boundary (the `fault-injection`
//! feature of hsm-shim); the logout is real.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use hsm_shim::pkcs11::{Function, RvError};
use hsm_shim::{
    EcdsaEncoding, ErrorKind, Exportability, Hsm, KeyLabel, KeySpec, MAX_RECOVERIES, SignAlgorithm,
    SignInput,
};
use softhsm_tests::{TestToken, token_test};

const DIGEST: [u8; 32] = [0x42; 32];

fn ready(token: &TestToken) -> (Hsm, KeyLabel) {
    let hsm = Hsm::open(token.config(1)).unwrap();
    let key = KeyLabel::new("ca/v1").unwrap();
    hsm.session()
        .unwrap()
        .generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable)
        .unwrap();
    (hsm, key)
}

/// Signs through the worker pool, as the daemon does.
fn sign(hsm: &Hsm, key: &KeyLabel) -> hsm_shim::Result<Vec<u8>> {
    let key = key.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(hsm.run(move |s| {
        s.sign(
            &key,
            SignAlgorithm::EcdsaP256Sha256,
            SignInput::Digest(&DIGEST),
            EcdsaEncoding::Der,
        )
    }))
}

fn fired(hsm: &Hsm, function: Function) -> usize {
    hsm.faults()
        .fired()
        .iter()
        .filter(|(f, _)| std::mem::discriminant(f) == std::mem::discriminant(&function))
        .count()
}

token_test!(
    fn a_lost_session_is_reopened_and_the_operation_completes(token) {
        let (hsm, key) = ready(token);
        for rv in [RvError::SessionHandleInvalid, RvError::SessionClosed, RvError::DeviceError] {
            hsm.faults().fail_next(Function::Sign, rv, 1);
            sign(&hsm, &key).unwrap_or_else(|e| panic!("{rv:?} not recovered: {e}"));
        }
        assert_eq!(fired(&hsm, Function::Sign), 3);
    }
);

token_test!(
    fn persistent_device_errors_end_in_a_clear_unavailable_error_after_bounded_retries(token) {
        let (hsm, key) = ready(token);
        let attempts = MAX_RECOVERIES + 1;
        hsm.faults().fail_next(Function::Sign, RvError::DeviceError, attempts + 5);
        let err = sign(&hsm, &key).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        let (function, rv) = err.pkcs11_cause().unwrap();
        assert!(matches!(function, Function::Sign));
        assert_eq!(rv, RvError::DeviceError);
        assert!(err.to_string().contains("CKR_DEVICE_ERROR"), "{err}");
        // Exactly the bound, not one call more.
        assert_eq!(fired(&hsm, Function::Sign), attempts as usize);

        // Once the device is back, the same worker serves again.
        hsm.faults().clear();
        sign(&hsm, &key).unwrap();
    }
);

token_test!(
    fn a_token_that_stays_absent_is_reported_unavailable(token) {
        let (hsm, key) = ready(token);
        // Every call fails, and so does every attempt to reopen a session.
        hsm.faults().fail_next(Function::Sign, RvError::TokenNotPresent, 100);
        hsm.faults().fail_next(Function::OpenSession, RvError::TokenNotPresent, 100);
        let err = sign(&hsm, &key).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert_eq!(fired(&hsm, Function::OpenSession), MAX_RECOVERIES as usize);
        hsm.faults().clear();
        sign(&hsm, &key).unwrap();
    }
);

token_test!(
    fn a_failed_reopen_is_retried_within_the_bound(token) {
        let (hsm, key) = ready(token);
        hsm.faults().fail_next(Function::Sign, RvError::SessionHandleInvalid, 1);
        hsm.faults().fail_next(Function::OpenSession, RvError::DeviceError, 1);
        sign(&hsm, &key).unwrap();
        assert_eq!(fired(&hsm, Function::OpenSession), 1);
    }
);

token_test!(
    fn a_logout_behind_our_back_is_followed_by_a_fresh_login(token) {
        let (hsm, key) = ready(token);
        sign(&hsm, &key).unwrap();
        // A real C_Logout: the whole application drops to public access, and
        // the cached private key handle is no longer usable.
        hsm.log_out_behind_our_back().unwrap();
        sign(&hsm, &key).unwrap();
        // Also when the handle cache is cold and the key looks "missing".
        hsm.log_out_behind_our_back().unwrap();
        hsm.faults().fail_next(Function::Sign, RvError::ObjectHandleInvalid, 1);
        sign(&hsm, &key).unwrap();
    }
);

token_test!(
    fn a_stale_object_handle_is_looked_up_again(token) {
        let (hsm, key) = ready(token);
        for rv in [RvError::ObjectHandleInvalid, RvError::KeyHandleInvalid] {
            hsm.faults().fail_next(Function::Sign, rv, 1);
            sign(&hsm, &key).unwrap();
        }
        assert_eq!(fired(&hsm, Function::Sign), 2);
    }
);

token_test!(
    fn errors_that_retrying_cannot_fix_are_not_retried(token) {
        let (hsm, key) = ready(token);
        hsm.faults().fail_next(Function::Sign, RvError::KeyFunctionNotPermitted, 3);
        let err = sign(&hsm, &key).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotPermitted);
        assert_eq!(fired(&hsm, Function::Sign), 1);
    }
);
