//! The `custody.v1` gRPC API. The `.proto` files and their generated code land
//! here with the signing service; this crate is the workspace's place for them.

#![forbid(unsafe_code)]
