//! custodyd, the signing and key-custody daemon, and custodyctl, its CLI.
//!
//! | module | owns |
//! |---|---|
//! | [`client`] | mTLS channels to custodyd (custodyctl, tests) |
//! | [`config`] | the TOML configuration |
//! | [`tls`] | mTLS: rustls config, CRLs, reload, the accept loop |
//! | [`identity`] | client certificate → principal and roles |
//! | [`service`] | the gRPC handlers (keys, signing, envelope, audit, operations) and the request shape they share |
//! | [`registry`] | keys and versions in sled, held in memory |
//! | [`audit`] | the hash-chained audit log, group commit, checkpoints, offline verification |
//! | [`algorithms`] | API algorithms and what they mean at the HSM |
//! | [`error`] | service errors and the one map to gRPC statuses |
//! | [`metrics`] | every Prometheus metric |
//! | [`pin_lockout`] | counting failed HSM logins across restarts |
//! | [`server`] | assembling and running the server |
//! | [`run`] | the process: config, signals, logging |
//! | [`dual_control`] | officers, quorum policies, approved operations |
//! | [`devpki`] | a development CA and certificates, for the demo and tests |
//! | [`lifecycle`] | NIST SP 800-57 version states: transitions and permitted uses |
//! | [`envelope`] | the self-describing ciphertext format and the nonce budget |
//! | [`scheduler`] | scheduled rotation and destruction, drift checks, crash roll-back |
//! | [`drift`] | comparing the registry with the objects the HSM holds |
//! | [`failpoint`] | crash points for the SIGKILL tests (test builds only) |
//! | [`ceremony`] | key ceremonies: so far the K-of-N share format |
//!
//! The HSM is reached only through `hsm-shim`.

#![forbid(unsafe_code)]

pub mod algorithms;
pub mod audit;
pub mod ceremony;
pub mod client;
pub mod config;
pub mod devpki;
pub mod drift;
pub mod dual_control;
pub mod envelope;
pub mod error;
pub mod failpoint;
pub mod identity;
pub mod lifecycle;
pub mod metrics;
pub mod pin_lockout;
pub mod registry;
pub mod run;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod tls;
