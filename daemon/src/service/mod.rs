//! The gRPC services, one file each: `keys.rs`, `signing.rs`, `envelope.rs`,
//! `audit.rs`, `operations.rs`, `ceremony.rs`.
//!
//! A handler only converts: it turns the request into the typed arguments
//! of a `custody-core` function, and the record that function returns into
//! the response. Every unary handler runs in one shell, [`serve`]: find the
//! caller, start the request's audit record, ask the decision
//! ([`custody_core::authz`]) whether the caller's roles allow the action
//! and whether the disk has room for it ([`custody_core::storage`]),
//! run the body, and record exactly one outcome, refusals included. The
//! domain below records intent durably before it changes anything; a
//! result is returned only after its record is durable.

pub mod audit;
pub mod ceremony;
pub mod envelope;
pub mod keys;
pub mod operations;
pub mod signing;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use custody_core::authz::{Action, authorize};
use custody_core::identity::Principal;
use custody_core::{Custody, Error, Reason, metrics};
use tonic::{Request, Response, Status};

use crate::gate::HandlerReached;
use crate::tls::PeerInfo;

/// Largest message (`data`) a sign or verify request may carry.
pub const MAX_SIGN_DATA: usize = 64 * 1024;

/// The authenticated caller of a request. Every handler asks first: from
/// then on it records the request's outcome itself (the gate records the
/// refusals that come before, [`crate::gate`]).
pub fn caller<T>(request: &Request<T>) -> Result<Principal, Error> {
    if let Some(reached) = request.extensions().get::<HandlerReached>() {
        reached.mark();
    }
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

/// The body of a request: what it does once the caller is known and
/// allowed. It may name the resource and detail in the audit record.
pub type Body<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// Whether a request runs in a task of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// In the caller's task: reads and refusals, which change nothing.
    Inline,
    /// To completion in a task of its own, so that a client that
    /// disconnects or times out cannot cancel a state change between an HSM
    /// call and the registry write that records it (a dropped future would
    /// release the registry lock with the HSM job still queued).
    ToCompletion,
}

/// Serves one unary request: caller → audit record started (naming
/// `resource`) → decision (`action`'s roles) → `body` → one audit outcome
/// → the response or the status its reason maps to.
pub async fn serve<R, T>(
    custody: &Shared,
    method: &'static str,
    action: Action,
    request: Request<R>,
    run: Run,
    resource: impl FnOnce(&R) -> String,
    body: impl for<'a> FnOnce(&'a Custody, &'a mut Audited, Principal, R) -> Body<'a, T>
    + Send
    + 'static,
) -> Result<Response<T>, Status>
where
    R: Send + 'static,
    T: Send + 'static,
{
    let principal = caller(&request);
    let request = request.into_inner();
    let mut audited = Audited::start(method);
    audited.resource = resource(&request);
    let custody = custody.clone();
    let work = async move {
        let result = async {
            let principal = principal?;
            audited.principal = principal.name.clone();
            authorize(&principal, action)?;
            custody.admit(!action.only_reads())?;
            body(&custody, &mut audited, principal, request).await
        }
        .await;
        audited.finish(&custody, result).await
    };
    match run {
        Run::Inline => work.await.map(Response::new),
        Run::ToCompletion => to_completion(work).await,
    }
}
