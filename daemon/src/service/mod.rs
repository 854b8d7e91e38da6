//! The gRPC services, one file each: `keys.rs`, `signing.rs`, `envelope.rs`,
//! `audit.rs`, `operations.rs`.
//!
//! Every handler follows one shape: find the caller, check the request (no HSM
//! call on bad input), check policy, act, and record exactly one audit record
//! for the request, refusals included. Anything that changes state records its
//! intent durably before acting; a signature is returned only after its record
//! is durable.

pub mod audit;
pub mod ceremony;
pub mod envelope;
pub mod keys;
pub mod operations;
pub mod signing;

use std::sync::Arc;
use std::time::Instant;

use custody_core::identity::{Principal, Role};
use custody_core::{Custody, Error, Reason, metrics};
use tonic::{Request, Status};

use crate::tls::PeerInfo;

/// Largest message (`data`) a sign or verify request may carry.
pub const MAX_SIGN_DATA: usize = 64 * 1024;

/// The authenticated caller of a request.
pub fn caller<T>(request: &Request<T>) -> Result<Principal, Error> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| Error::new(Reason::Unauthenticated, "no authenticated TLS peer"))?;
    match peer.principal.as_ref() {
        Ok(principal) => Ok(principal.clone()),
        Err(why) => Err(Error::new(
            Reason::NoCustodyIdentity,
            format!("the client certificate maps to no custody principal: {why}"),
        )),
    }
}

/// Refuses unless `principal` holds `role`.
pub fn require(principal: &Principal, role: Role) -> Result<(), Error> {
    if principal.has(role) {
        Ok(())
    } else {
        Err(Error::new(
            Reason::RoleRequired,
            format!(
                "this needs the {role} role, which {} does not hold",
                principal.name
            ),
        ))
    }
}

/// The audit record of a request ([`custody_core::action::Audited`]) and
/// when it started, for the request metric.
pub struct Audited {
    record: custody_core::action::Audited,
    started: Instant,
}

impl std::ops::Deref for Audited {
    type Target = custody_core::action::Audited;
    fn deref(&self) -> &Self::Target {
        &self.record
    }
}

impl std::ops::DerefMut for Audited {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.record
    }
}

impl Audited {
    /// Starts the record of a request.
    pub fn start(method: &'static str) -> Self {
        Self {
            record: custody_core::action::Audited::start(method),
            started: Instant::now(),
        }
    }

    /// Records the outcome (one record per request) and returns what the caller
    /// gets. A success whose record cannot be made durable becomes
    /// `UNAVAILABLE`: the caller never gets a result that was not audited.
    pub async fn finish<T>(self, state: &Custody, result: Result<T, Error>) -> Result<T, Status> {
        self.record(state, result)
            .await
            .map_err(crate::status::to_status)
    }

    /// [`Self::finish`], keeping the error as an [`Error`] (for streams,
    /// whose failed items travel inside responses).
    pub async fn record<T>(self, state: &Custody, result: Result<T, Error>) -> Result<T, Error> {
        let method = self.record.method;
        let result = self.record.record(state, result).await;
        let code = result
            .as_ref()
            .map_or_else(|e| crate::status::code(e.reason), |_| tonic::Code::Ok);
        metrics::request(
            method,
            format!("{code:?}"),
            self.started.elapsed().as_secs_f64(),
        );
        result
    }
}

/// Shared state for the services.
pub type Shared = Arc<Custody>;

/// Runs a state-changing request in a task of its own, so that a client
/// that disconnects or times out cannot cancel it between an HSM call and
/// the registry write that records it (a dropped future would release the
/// registry lock with the HSM job still queued).
pub async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<tonic::Response<T>, Status> {
    tokio::spawn(work)
        .await
        .map_err(|_| Status::internal("the request's task failed"))?
        .map(tonic::Response::new)
}

/// A protobuf timestamp from Unix milliseconds.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_milliseconds() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
    }
}
