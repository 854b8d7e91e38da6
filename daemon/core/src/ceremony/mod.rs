//! What key ceremonies are made of: scripts, the journal, shares,
//! components, fingerprints, the root certificate, transcripts and backup
//! bundles. The engine that runs them is the `ceremonies` module, above this one.
//!
//! | module | owns |
//! |---|---|
//! | [`journal`] | ceremony records and the backup KEK in the store |
//! | [`script`] | ceremony scripts: parsing, validation, the plan |
//! | [`state`] | what the engine keeps between steps (journal, lock, secrets in memory) |
//! | [`shares`] | the K-of-N share format custodians hold |
//! | [`components`] | key components, their check values, and combining them |
//! | [`certificate`] | the self-signed root certificate, signed in the HSM |
//! | [`intermediate`] | a subordinate CA certificate: its TBS built and linted, then signed in the HSM |
//! | [`csr`] | a PKCS#10 CSR an intermediate certifies instead of a custody key: checked, its subject and key taken |
//! | [`cross_sign`] | an existing CA certificate a cross-sign ceremony re-issues under a custody root: checked, its subject, key and key identifier taken |
//! | [`lint`] | the lint of a TBS certificate before the HSM signs it |
//! | [`crl`] | a CRL: its TBS built and linted (its own rules), then signed in the HSM |
//! | [`fingerprint`] | fingerprints as hex and as words to read aloud |
//! | [`transcript`] | the hash-chained, signed ceremony transcript |
//! | [`bundle`] | backup bundles and their signed manifest |
//! | [`destruction`] | a key-destruction ceremony's manifest and the progress of its destroy step |

pub mod bundle;
pub mod certificate;
pub mod components;
pub mod crl;
pub mod cross_sign;
pub mod csr;
pub mod destruction;
pub mod fingerprint;
pub mod intermediate;
pub mod journal;
pub mod lint;
pub mod script;
pub mod shares;
pub mod state;
pub mod transcript;
