//! custodyd and custodyctl. The gRPC service, key registry, audit log and
//! approvals land here; the HSM itself is reached only through `hsm-shim`.

#![forbid(unsafe_code)]
