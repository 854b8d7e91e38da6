//! Key ceremonies. So far: the K-of-N share format custodians hold
//! ([`shares`]); the journaled ceremony engine, scripts, backup and restore
//! build on it.

pub mod shares;
