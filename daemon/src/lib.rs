//! The face of custody: `custodyd`'s gRPC API over mTLS, and `custodyctl`,
//! its CLI. Everything custody decides and does lives in `custody-core`,
//! which knows nothing of gRPC; this crate converts requests into its typed
//! arguments, finds the caller, and maps its errors to statuses.
//!
//! | module | owns |
//! |---|---|
//! | [`service`] | the gRPC handlers, one file per service, and the shape they share |
//! | [`status`] | the one map from a domain reason to a gRPC status |
//! | [`tls`] | mTLS: rustls config, CRLs, reload (open connections checked again), the connections' certificates |
//! | [`listener`] | the accept loop: caps on connections and handshakes, rate-limited refusal logs |
//! | [`gate`] | the layer below the handlers: per-request certificate check, refusals no handler sees, audited |
//! | [`health`] | the gRPC health service: liveness, per-service readiness, the signing self-test |
//! | [`metrics_http`] | the Prometheus endpoint: `/metrics` only, 404 elsewhere |
//! | [`server`] | assembling and running the server |
//! | [`run`] | the process: config, signals, logging |
//! | [`notify`] | systemd notifications: ready, reloading, stopping, status, watchdog |
//! | [`client`] | mTLS channels to custodyd (custodyctl, tests) |
//! | [`review`] | what an officer signs: an operation rebuilt from its structure, rendered, its digest recomputed and compared with custodyd's |
//! | [`wire`] | domain values ⇄ `custody.v1` messages shared by several services |
//! | [`devpki`] | a development CA and certificates, for the demo and tests |

#![forbid(unsafe_code)]

pub mod client;
pub mod devpki;
pub mod gate;
pub mod health;
pub mod listener;
pub mod metrics_http;
pub mod notify;
pub mod phases;
pub mod review;
pub mod run;
pub mod server;
pub mod service;
pub mod status;
pub mod tls;
pub mod wire;
