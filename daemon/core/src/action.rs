//! The audit record of one action: who did what to which resource, its
//! intent before it changes anything, and exactly one outcome.
//!
//! A request served through the API is one action; so is each thing the
//! scheduler or the quorum executor does on its own. A success whose record
//! cannot be made durable becomes [`Reason::AuditUnavailable`]: nobody gets a
//! result that was not audited.

use crate::audit::Event;
use crate::{Custody, Error};

/// What the audit record of an action says.
#[derive(Debug, Clone)]
pub struct Audited {
    /// The action: the API method name, or the internal actor's.
    pub method: &'static str,
    /// Who acts, or `-` while unknown.
    pub principal: String,
    /// Resource name.
    pub resource: String,
    /// Details (for a signature, the digest).
    pub detail: String,
    /// The request's id: in its audit records and its log line.
    pub request_id: String,
}

/// A fresh request id: 64 random bits, hex.
pub fn new_request_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No randomness: still unique within this process.
        bytes = COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_be_bytes();
    }
    hex::encode(bytes)
}

impl Audited {
    /// Starts the record of an action.
    pub fn start(method: &'static str) -> Self {
        Self {
            method,
            principal: "-".into(),
            resource: String::new(),
            detail: String::new(),
            request_id: new_request_id(),
        }
    }

    /// Records the outcome (one record per action) and returns it. A success
    /// whose record cannot be made durable becomes `AUDIT_UNAVAILABLE`.
    pub async fn record<T>(self, custody: &Custody, result: Result<T, Error>) -> Result<T, Error> {
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.reason.as_str().to_string(),
        };
        // The request's log line, with the id its audit record carries.
        tracing::info!(
            target: "custody::request",
            request_id = %self.request_id,
            method = self.method,
            principal = %crate::text::escape(&self.principal),
            resource = %crate::text::escape(&self.resource),
            outcome = %outcome,
            "request"
        );
        let event = Event::Request {
            principal: self.principal,
            method: self.method.into(),
            resource: self.resource,
            detail: self.detail,
            outcome,
            request_id: Some(self.request_id),
        };
        let recorded = custody.audit.append(event).await;
        match (result, recorded) {
            (Ok(value), Ok(_)) => Ok(value),
            (Ok(_), Err(e)) => Err(Error::audit_unavailable(&e)),
            (Err(error), Err(audit_error)) => {
                tracing::error!(%audit_error, reason = %error.reason, "refusal could not be audited");
                Err(error)
            }
            (Err(error), Ok(_)) => Err(error),
        }
    }

    /// Records that the action is about to change state, before it does.
    pub async fn intent(&self, custody: &Custody) -> Result<(), Error> {
        custody
            .audit
            .append(Event::Request {
                principal: self.principal.clone(),
                method: self.method.into(),
                resource: self.resource.clone(),
                detail: self.detail.clone(),
                outcome: "requested".into(),
                request_id: Some(self.request_id.clone()),
            })
            .await
            .map(drop)
            .map_err(|e| Error::audit_unavailable(&e))
    }
}
