//! Key ceremonies.
//!
//! | module | owns |
//! |---|---|
//! | [`engine`] | the journaled state machine that runs a script, and crash recovery |
//! | [`export`] | a backup bundle of the live registry's backup-exportable keys |
//! | [`journal`] | ceremony records and the backup KEK in sled |
//! | [`script`] | ceremony scripts: parsing, validation, the plan |
//! | [`shares`] | the K-of-N share format custodians hold |
//! | [`components`] | key components, their check values, and combining them |
//! | [`certificate`] | the self-signed root certificate, signed in the HSM |
//! | [`fingerprint`] | fingerprints as hex and as words to read aloud |
//! | [`transcript`] | the hash-chained, signed ceremony transcript |
//! | [`bundle`] | backup bundles and their signed manifest |

pub mod bundle;
pub mod certificate;
pub mod components;
pub mod engine;
pub mod export;
pub mod fingerprint;
pub mod journal;
pub mod script;
pub mod shares;
pub mod transcript;
