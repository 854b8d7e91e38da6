//! The HSM boundary of custody: the only crate that talks PKCS#11.
//!
//! - [`Hsm`] (`pool.rs`) opens a module and a token and serves async callers
//!   from worker threads, each owning a logged-in session.
//! - [`HsmSession`] (`session.rs`) is one session plus the recovery rules
//!   (reopen, re-login, re-find, bounded). Its operations are grouped one family
//!   per file: `keys.rs` (generate, public key, destroy), `sign.rs` (sign,
//!   verify), `wrap.rs` (RFC 5649 wrap and unwrap, import, AES-GCM),
//!   `inventory.rs` (every object on the token, for drift detection).
//! - `store_lock.rs` keeps the object store still while a search reads
//!   it, across processes too on SoftHSM2 (replicas sharing a token).
//! - `watchdog.rs` puts a deadline on every call of a pool worker: a hung
//!   call fails its job with [`ErrorKind::Timeout`] and its worker is
//!   abandoned and replaced.
//! - [`security_officer`] makes the trusted backup KEK, the one thing only
//!   the token's SO may do, with [`Hsm::create_trusted_kek`]: the pool pauses
//!   while the SO is logged in, because login state is per application.
//! - `encoding.rs` turns PKCS#11 attributes into `SubjectPublicKeyInfo` and
//!   converts ECDSA signatures between raw and DER.
//! - [`HsmError`] (`error.rs`) keeps the PKCS#11 function and `CKR_*` code and
//!   reduces them to one [`ErrorKind`], which the daemon maps to gRPC statuses.
//!
//! - `floor` (feature `bench-floor`, benchmarks only): plain cryptoki
//!   signing with none of the above, the baseline every benchmark is a
//!   ratio of.
//!
//! Nothing outside this crate names a `cryptoki` type except through
//! [`pkcs11`], which re-exports the two needed to read an error's cause.

#![forbid(unsafe_code)]

mod config;
mod encoding;
mod error;
mod fault;
#[cfg(feature = "bench-floor")]
pub mod floor;
mod inventory;
mod keys;
mod pool;
pub mod security_officer;
mod session;
mod sign;
mod store_lock;
mod types;
mod watchdog;
mod wrap;

pub use config::{HsmConfig, PinSource, TokenSelector};
pub use encoding::PublicKey;
pub use error::{ErrorKind, HsmError, Result};
pub use fault::FAULT_INJECTION_COMPILED_IN;
#[cfg(feature = "fault-injection")]
pub use fault::{FaultInjector, Stall};
pub use inventory::{ObjectClassName, ObjectSummary};
pub use pool::Hsm;
pub use session::{HsmSession, MAX_RECOVERIES};
pub use types::{
    AesRole, EcdsaEncoding, Exportability, GcmCiphertext, HashAlg, KeyCheckValue, KeyInfo,
    KeyLabel, KeySpec, SignAlgorithm, SignInput, TokenSummary,
};
pub use watchdog::{MAX_ABANDONED_PER_WORKER, MAX_CALL_TIMEOUT};

/// The PKCS#11 names that appear in [`HsmError::pkcs11_cause`] and in the
/// fault-injection API.
pub mod pkcs11 {
    pub use cryptoki::context::Function;
    pub use cryptoki::error::RvError;
}

/// Secret types used in this crate's API, re-exported so that callers use the
/// same versions.
pub use secrecy::{ExposeSecret, SecretSlice, SecretString};
