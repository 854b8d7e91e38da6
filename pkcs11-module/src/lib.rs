//! `libcustody_pkcs11.so`: a PKCS#11 v2.40 module that signs with custody
//! keys through custodyd, so that CA and signing software which speaks
//! PKCS#11 (OpenSSL's engine or provider, EJBCA, step-ca, OpenSC's
//! pkcs11-tool) uses custody keys unchanged, with custody's allow-lists,
//! quorum, lifecycle and audit still deciding.
//!
//! The module holds no key material: a private key object is a name for a
//! custody key version, and every signature is made by custodyd in its HSM
//! after custody's checks. The caller's identity is the client certificate
//! of the configuration (`CUSTODY_PKCS11_CONF`); `C_Login` is accepted and
//! changes nothing custodyd sees.
//!
//! Layout: [`ffi`] is the C ABI and the crate's only `unsafe` code;
//! [`module`] the state (slots, sessions, operations); [`objects`] the
//! key objects and their attributes; [`mechanisms`] which mechanism fits
//! which key and what custody signs; [`remote`] the config and the gRPC
//! calls; [`errors`] the one map from custody's refusals to CKR codes.

#![deny(unsafe_code)]

pub mod errors;
#[allow(unsafe_code)]
pub mod ffi;
pub mod log;
pub mod mechanisms;
pub mod module;
pub mod objects;
pub mod remote;
