//! The `custody.v1` gRPC API, generated at build time from
//! `proto/custody/v1/*.proto` with protox (no system `protoc`).

#![forbid(unsafe_code)]

pub mod codec;

pub use codec::{ERROR_DOMAIN, reason, retry_after};

/// The `custody.v1` package.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("custody.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("custody_descriptor");
}
