//! custody's domain: everything custodyd decides and does, below the API it
//! is served through.
//!
//! This crate does not depend on tonic, prost or the generated `custody.v1`
//! types: a handler in `custody-daemon` converts a request into the typed
//! arguments of a function here and maps the [`Error`] it gets back to a
//! status. Internal actors (the scheduler, the quorum executor, the ceremony
//! engine, drift checks) call the same functions, never a handler.
//!
//! | module | owns |
//! |---|---|
//! | [`custody`] | [`Custody`], what every action reaches: HSM, registry, audit, officers, ceremonies, clock |
//! | [`error`] | [`Reason`] and [`Error`], the one error vocabulary |
//! | [`names`] | resource names and key ids (`keys/{id}/versions/{n}`), HSM labels |
//! | [`text`] | free text people read (reasons, descriptions): no control, bidi or zero-width characters, capped; input echoed in errors, cut short |
//! | [`clock`] | the time every rule reads (injected in tests) |
//! | [`action`] | the audit record of one action: intent before acting, one outcome |
//! | [`config`] | the TOML configuration |
//! | [`encoding`] | the small text encodings read in more than one place: PEM public keys, lower-case hex fields |
//! | [`identity`] | principals and roles, and how a client certificate names them |
//! | [`algorithms`] | key algorithms and what they mean at the HSM |
//! | [`authz`] | the one decision: roles, allow-lists, acting officers, quorum gates, which quorum governs an operation |
//! | [`keys`] | creating, rotating, changing and destroying keys and versions (one journaled generation protocol) |
//! | [`registry`] | keys and versions in the store, held in memory |
//! | [`lifecycle`] | NIST SP 800-57 version states: transitions and permitted uses |
//! | [`audit`] | the hash-chained audit log, group commit, checkpoints, offline verification |
//! | [`dual_control`] | officers, quorum policies, approved operations |
//! | [`operations`] | operations waiting for officer approval: request, read, vote, execute |
//! | [`envelope`] | the self-describing ciphertext format and the nonce budget |
//! | [`budget`] | the durable per-version nonce budget of AES-GCM keys |
//! | [`ceremony`] | what ceremonies are made of: scripts, the journal and engine state, shares, components, bundles, transcripts |
//! | [`ceremonies`] | the journaled engine that runs ceremonies, backups, restores and drills, and recovers them after a crash |
//! | [`drift`] | comparing the registry with the objects the HSM holds |
//! | [`shared`] | what keeps replicas on one store coherent: per-domain epochs (stale copies, write fences) and domain locks |
//! | [`scheduler`] | what runs without a request: crash roll-back at start, scheduled rotation and destruction, drift checks |
//! | [`signing`] | sign and verify: every check before the HSM call, the call, the audit record |
//! | [`metrics`] | every Prometheus metric |
//! | [`pin_lockout`] | counting failed HSM logins across restarts |
//! | [`integrity`] | the data directory checked at start and by `custodyd --check`: every tree's check, the checks across trees, the report; a data directory lost while the token survived |
//! | [`stored`] | how a JSON record lies in the store: a CRC-32C over its key and JSON, then the JSON |
//! | [`findings`] | what a check of stored records finds (tree, key, what was expected), and reading a tree without making it |
//! | [`limits`] | the caps on work one caller takes on: pending operations, open ceremonies, one drift check and one audit verification at a time |
//! | [`failpoint`] | crash points for the SIGKILL tests (test builds only) |
//!
//! The HSM is reached only through `hsm-shim`.

#![forbid(unsafe_code)]

pub mod action;
pub mod algorithms;
pub mod audit;
pub mod authz;
pub mod budget;
pub mod ceremonies;
pub mod ceremony;
pub mod clock;
pub mod config;
pub mod custody;
pub mod drift;
pub mod dual_control;
pub mod encoding;
pub mod envelope;
pub mod error;
pub mod failpoint;
pub mod findings;
pub mod identity;
pub mod integrity;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod names;
pub mod operations;
pub mod pin_lockout;
pub mod readiness;
pub mod registry;
pub mod scheduler;
pub mod shared;
pub mod signing;
pub mod storage;
pub mod stored;
pub mod text;

pub use custody::Custody;
pub use error::{Error, Reason};
