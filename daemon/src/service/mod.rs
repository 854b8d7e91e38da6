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

use hsm_shim::Hsm;
use tonic::{Request, Status};

use crate::algorithms::KeyAlgorithm;
use crate::audit::{AuditLog, Event};
use crate::dual_control::store::DualControlStore;
use crate::error::ServiceError;
use crate::identity::{Principal, Role};
use crate::metrics;
use crate::registry::Registry;
use crate::tls::PeerInfo;

/// What every handler shares.
pub struct State {
    /// The HSM.
    pub hsm: Hsm,
    /// Keys and versions.
    pub registry: Registry,
    /// The audit log.
    pub audit: AuditLog,
    /// Algorithms keys may be created with.
    pub allowed_algorithms: Vec<KeyAlgorithm>,
    /// Officers and operations.
    pub dual_control: DualControlStore,
    /// How long operations wait for approvals, in milliseconds.
    pub approval_ttl_ms: i64,
    /// Whether a signed denial vetoes.
    pub denial_vetoes: bool,
    /// The time, for approval expiry, cryptoperiods and scheduled
    /// destruction (injected in tests).
    pub clock: Arc<dyn Clock>,
    /// Cancel window, scheduler and drift intervals.
    pub lifecycle: crate::config::LifecycleSection,
    /// Encryptions per AES version.
    pub budget: crate::envelope::NonceBudget,
    /// Key ceremonies: the journal and the engine's state.
    pub ceremonies: crate::ceremony::engine::Ceremonies,
}

/// Where dual control reads the time from.
pub trait Clock: Send + Sync {
    /// Unix milliseconds now.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// Largest message (`data`) a sign or verify request may carry.
pub const MAX_SIGN_DATA: usize = 64 * 1024;

/// The authenticated caller of a request.
pub fn caller<T>(request: &Request<T>) -> Result<Principal, ServiceError> {
    let peer = request.extensions().get::<PeerInfo>().ok_or_else(|| {
        ServiceError::new(
            tonic::Code::Unauthenticated,
            "UNAUTHENTICATED",
            "no authenticated TLS peer",
        )
    })?;
    match peer.principal.as_ref() {
        Ok(principal) => Ok(principal.clone()),
        Err(why) => Err(ServiceError::new(
            tonic::Code::PermissionDenied,
            "NO_CUSTODY_IDENTITY",
            format!("the client certificate maps to no custody principal: {why}"),
        )),
    }
}

/// Refuses unless `principal` holds `role`.
pub fn require(principal: &Principal, role: Role) -> Result<(), ServiceError> {
    if principal.has(role) {
        Ok(())
    } else {
        Err(ServiceError::denied(
            "ROLE_REQUIRED",
            format!(
                "this needs the {role} role, which {} does not hold",
                principal.name
            ),
        ))
    }
}

/// What the audit record of a request says.
pub struct Audited {
    /// gRPC method name.
    pub method: &'static str,
    /// Caller, or `-`.
    pub principal: String,
    /// Resource name.
    pub resource: String,
    /// Details (for a signature, the digest).
    pub detail: String,
    started: Instant,
}

impl Audited {
    /// Starts the record of a request.
    pub fn start(method: &'static str) -> Self {
        Self {
            method,
            principal: "-".into(),
            resource: String::new(),
            detail: String::new(),
            started: Instant::now(),
        }
    }

    /// Records the outcome (one record per request) and returns what the caller
    /// gets. A success whose record cannot be made durable becomes
    /// `UNAVAILABLE`: the caller never gets a result that was not audited.
    pub async fn finish<T>(
        self,
        state: &State,
        result: Result<T, ServiceError>,
    ) -> Result<T, Status> {
        self.record(state, result).await.map_err(Status::from)
    }

    /// [`Self::finish`], keeping the error as a [`ServiceError`] (for streams,
    /// whose failed items travel inside responses).
    pub async fn record<T>(
        self,
        state: &State,
        result: Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.reason.to_string(),
        };
        let event = Event::Request {
            principal: self.principal,
            method: self.method.into(),
            resource: self.resource,
            detail: self.detail,
            outcome,
        };
        let recorded = state.audit.append(event).await;
        let result = match (result, recorded) {
            (Ok(value), Ok(_)) => Ok(value),
            (Ok(_), Err(e)) => Err(ServiceError::audit_unavailable(&e)),
            (Err(error), Err(audit_error)) => {
                tracing::error!(%audit_error, reason = error.reason, "refusal could not be audited");
                Err(error)
            }
            (Err(error), Ok(_)) => Err(error),
        };
        let code = result.as_ref().map_or_else(|e| e.code, |_| tonic::Code::Ok);
        metrics::request(self.method, code, self.started.elapsed().as_secs_f64());
        result
    }

    /// Records that the request is about to change state, before it does.
    pub async fn intent(&self, state: &State) -> Result<(), ServiceError> {
        state
            .audit
            .append(Event::Request {
                principal: self.principal.clone(),
                method: self.method.into(),
                resource: self.resource.clone(),
                detail: self.detail.clone(),
                outcome: "requested".into(),
            })
            .await
            .map(drop)
            .map_err(|e| ServiceError::audit_unavailable(&e))
    }
}

/// Shared state for the services.
pub type Shared = Arc<State>;

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

/// `keys/{key_id}`: the key id, checked.
pub fn parse_key_name(name: &str) -> Result<&str, ServiceError> {
    let id = name.strip_prefix("keys/").ok_or_else(|| {
        ServiceError::invalid(
            "BAD_NAME",
            format!("{name:?} is not of the form keys/{{key_id}}"),
        )
    })?;
    check_key_id(id)?;
    Ok(id)
}

/// `keys/{key_id}` or `keys/{key_id}/versions/{n}`.
pub fn parse_version_name(name: &str) -> Result<(&str, Option<u32>), ServiceError> {
    let bad = || {
        ServiceError::invalid(
            "BAD_NAME",
            format!(
                "{name:?} is not of the form keys/{{key_id}} or keys/{{key_id}}/versions/{{n}}"
            ),
        )
    };
    let rest = name.strip_prefix("keys/").ok_or_else(bad)?;
    match rest.split_once("/versions/") {
        None => {
            check_key_id(rest)?;
            Ok((rest, None))
        }
        Some((id, version)) => {
            check_key_id(id)?;
            let version: u32 = version.parse().map_err(|_| bad())?;
            if version == 0 {
                return Err(bad());
            }
            Ok((id, Some(version)))
        }
    }
}

/// 1-63 of `[a-z0-9-]`, starting with a letter.
pub fn check_key_id(id: &str) -> Result<(), ServiceError> {
    let valid = !id.is_empty()
        && id.len() <= 63
        && id.as_bytes()[0].is_ascii_lowercase()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "BAD_KEY_ID",
            format!(
                "key id {id:?} must be 1-63 lower-case letters, digits or '-', starting with a letter"
            ),
        ))
    }
}

/// The name of a version.
pub fn version_name(key_id: &str, version: u32) -> String {
    format!("keys/{key_id}/versions/{version}")
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
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
    fn names_parse_strictly() {
        assert_eq!(
            parse_version_name("keys/root-ca").unwrap(),
            ("root-ca", None)
        );
        assert_eq!(
            parse_version_name("keys/root-ca/versions/3").unwrap(),
            ("root-ca", Some(3))
        );
        for bad in [
            "",
            "keys/",
            "root-ca",
            "keys/Root",
            "keys/1abc",
            "keys/a/versions/0",
            "keys/a/versions/x",
            "keys/a/versions/",
            "keys/a/b",
            "keys/a/versions/1/extra",
        ] {
            assert!(parse_version_name(bad).is_err(), "{bad}");
        }
        assert!(parse_key_name("keys/a/versions/1").is_err());
    }

    #[test]
    fn timestamps_split_milliseconds() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
    }
}
