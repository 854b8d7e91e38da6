//! The request gate: a layer around tonic's router, so below every handler.
//! For every request it checks what no handler can, and audits every refusal
//! no handler sees:
//!
//! - the connection's certificate still counts ([`Connection::check`]): a
//!   reload has not found it revoked, expired or of a CA no longer trusted,
//!   and it has not expired since the handshake
//!   (`CERTIFICATE_NO_LONGER_VALID`; the connection is closed);
//! - the method exists (`UNKNOWN_METHOD`);
//! - the caller of a `custody.v1` method has a custody identity
//!   (`NO_CUSTODY_IDENTITY`);
//! - after the router: a `custody.v1` request that no handler took was
//!   refused by the transport, for a message over `max_message_bytes`
//!   (`MESSAGE_TOO_LARGE`) or one that does not decode
//!   (`UNDECODABLE`).
//!
//! Each such refusal is one audit record — the principal when the
//! certificate names one, the method, and the certificate's subject, serial
//! and SHA-256 — durable before the answer; if it cannot be written the
//! answer is `AUDIT_UNAVAILABLE` (fail closed). A handler marks the request
//! as it takes it ([`HandlerReached`], set by `service::caller`) and records
//! its own outcome from then on. Health and reflection answer without a
//! record. TLS handshake refusals never get here (no RPC ran): they are in
//! metrics and logs only.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use prost::Message;
use tonic::Code;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};

use crate::tls::PeerInfo;
use custody_core::audit::Event;
use custody_core::{Custody, Error, Reason, metrics};

/// Longest method path an audit record quotes for a method that does not
/// exist.
const MAX_PATH_CHARS: usize = 128;

/// Put on every request by the gate; a handler sets it when it takes the
/// request (and so records the outcome itself).
#[derive(Debug, Clone, Default)]
pub struct HandlerReached(Arc<AtomicBool>);

impl HandlerReached {
    /// The handler has the request.
    pub fn mark(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_marked(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The reason a request message the transport could not read is refused
/// for, from the code the transport answered; `None` when the code says the
/// client went away rather than sent something unreadable.
pub fn unreadable_message(code: Code) -> Option<Reason> {
    match code {
        Code::OutOfRange | Code::ResourceExhausted => Some(Reason::MessageTooLarge),
        Code::Internal | Code::InvalidArgument | Code::Unimplemented => Some(Reason::Undecodable),
        _ => None,
    }
}

/// A method the server has: what audit records call it, and whether it is
/// custody's own (`custody.v1`) rather than health or reflection.
#[derive(Debug, Clone)]
struct Method {
    name: String,
    custody: bool,
}

/// Every method served, by path (`/package.Service/Method`), from the
/// services' own descriptors.
#[derive(Debug)]
struct Methods(HashMap<String, Method>);

impl Methods {
    fn served() -> Result<Methods, String> {
        let mut methods = HashMap::new();
        for (encoded, custody) in [
            (custody_proto::v1::FILE_DESCRIPTOR_SET, true),
            (tonic_health::pb::FILE_DESCRIPTOR_SET, false),
            (tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET, false),
            (tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET, false),
        ] {
            let set = prost_types::FileDescriptorSet::decode(encoded)
                .map_err(|e| format!("service descriptors: {e}"))?;
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        let path =
                            format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        // Handlers name custody's methods by their RPC name.
                        let name = if custody {
                            method.name().to_string()
                        } else {
                            path.clone()
                        };
                        methods.insert(path, Method { name, custody });
                    }
                }
            }
        }
        Ok(Methods(methods))
    }
}

/// The [`tower_layer::Layer`] that puts a [`Gate`] around the router.
#[derive(Clone)]
pub struct GateLayer {
    custody: Arc<Custody>,
    methods: Arc<Methods>,
    max_message_bytes: usize,
}

impl GateLayer {
    /// A gate that audits into `custody`'s log; `max_message_bytes` is the
    /// configured limit, quoted in refusals.
    pub fn new(custody: Arc<Custody>, max_message_bytes: usize) -> Result<GateLayer, String> {
        Ok(GateLayer {
            custody,
            methods: Arc::new(Methods::served()?),
            max_message_bytes,
        })
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            layer: self.clone(),
        }
    }
}

/// The gate around the router `S`.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    layer: GateLayer,
}

impl<S> Service<Request<Body>> for Gate<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // The clone is the one made ready; this one is left for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let peer = request.extensions().get::<PeerInfo>().cloned();
            let method = layer.methods.0.get(&path).cloned();
            let refusal = Refusal {
                method: method
                    .as_ref()
                    .map_or_else(|| quoted_path(&path), |m| m.name.clone()),
                peer: peer.clone(),
            };
            if let Some(peer) = &peer {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                if let Err(error) = peer.connection.check(now) {
                    return Ok(refusal.refuse(&layer.custody, error).await);
                }
            }
            let Some(method) = method else {
                let error = Error::new(Reason::UnknownMethod, "no such service or method");
                return Ok(refusal.refuse(&layer.custody, error).await);
            };
            if method.custody {
                if let Some(Err(why)) = peer.as_ref().map(|p| p.principal.as_ref()) {
                    let error = Error::new(
                        Reason::NoCustodyIdentity,
                        format!("the client certificate maps to no custody principal: {why}"),
                    );
                    return Ok(refusal.refuse(&layer.custody, error).await);
                }
            }
            let reached = HandlerReached::default();
            request.extensions_mut().insert(reached.clone());
            let response = inner.call(request).await?;
            if !method.custody || reached.is_marked() {
                return Ok(response);
            }
            // A custody request no handler took: the transport refused it
            // while reading its message.
            let Some(code) = response
                .headers()
                .get("grpc-status")
                .map(|value| Code::from_bytes(value.as_bytes()))
                .filter(|code| *code != Code::Ok)
            else {
                return Ok(response);
            };
            let reason = unreadable_message(code).unwrap_or(Reason::Undecodable);
            if reason == Reason::MessageTooLarge {
                let error = Error::new(
                    Reason::MessageTooLarge,
                    format!(
                        "the request message is over the {} bytes this server accepts",
                        layer.max_message_bytes
                    ),
                );
                return Ok(refusal.refuse(&layer.custody, error).await);
            }
            // The answer stays the transport's; the record names the reason.
            let error = Error::new(reason, "");
            match refusal.record(&layer.custody, &error).await {
                Ok(()) => Ok(response),
                Err(unavailable) => Ok(answer(unavailable)),
            }
        })
    }
}

/// A request the gate refuses, and what its record names.
struct Refusal {
    method: String,
    peer: Option<PeerInfo>,
}

impl Refusal {
    /// Records the refusal and answers with `error`'s status, or with
    /// `AUDIT_UNAVAILABLE` if the record could not be made durable.
    async fn refuse(self, custody: &Arc<Custody>, error: Error) -> Response<Body> {
        match self.record(custody, &error).await {
            Ok(()) => answer(error),
            Err(unavailable) => answer(unavailable),
        }
    }

    /// Appends the refusal's record and waits until it is durable (in a
    /// task of its own, so a client that goes away cannot cut it short).
    async fn record(self, custody: &Arc<Custody>, error: &Error) -> Result<(), Error> {
        metrics::refused_before_handler(error.reason.as_str());
        let (principal, detail) = match &self.peer {
            Some(peer) => (
                peer.principal
                    .as_ref()
                    .as_ref()
                    .map_or_else(|_| "-".to_string(), |p| p.name.clone()),
                peer.connection.certificate.to_string(),
            ),
            None => ("-".to_string(), String::new()),
        };
        let request_id = custody_core::action::new_request_id();
        tracing::info!(
            target: "custody::request",
            request_id = %request_id,
            method = %self.method,
            principal = %custody_core::text::escape(&principal),
            resource = "",
            outcome = error.reason.as_str(),
            "request"
        );
        let event = Event::Request {
            principal,
            method: self.method,
            resource: String::new(),
            detail,
            outcome: error.reason.as_str().into(),
            request_id: Some(request_id),
        };
        let custody = custody.clone();
        let appended = tokio::spawn(async move { custody.audit.append(event).await }).await;
        match appended {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(audit_error)) => {
                tracing::error!(%audit_error, reason = %error.reason, "refusal could not be audited");
                Err(Error::audit_unavailable(&audit_error))
            }
            Err(_) => Err(Error::internal("the audit task failed")),
        }
    }
}

/// The response carrying `error`'s status.
fn answer(error: Error) -> Response<Body> {
    crate::status::to_status(error).into_http()
}

/// `path` as a record of a method that does not exist names it: at most
/// [`MAX_PATH_CHARS`] characters, control characters escaped.
fn quoted_path(path: &str) -> String {
    path.chars()
        .take(MAX_PATH_CHARS)
        .flat_map(char::escape_default)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_is_known_and_custody_methods_go_by_their_rpc_name() {
        let methods = Methods::served().expect("descriptors decode");
        let sign = &methods.0["/custody.v1.SigningService/Sign"];
        assert!(sign.custody && sign.name == "Sign");
        let check = &methods.0["/grpc.health.v1.Health/Check"];
        assert!(!check.custody && check.name == "/grpc.health.v1.Health/Check");
        assert!(
            methods
                .0
                .contains_key("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        );
        assert!(
            methods
                .0
                .contains_key("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        );
        assert!(
            !methods
                .0
                .contains_key("/custody.v1.SigningService/SignAnything")
        );
        assert!(methods.0.values().filter(|m| m.custody).count() >= 30);
    }

    #[test]
    fn unknown_paths_are_quoted_short_and_escaped() {
        assert_eq!(quoted_path("/a.B/C"), "/a.B/C");
        assert_eq!(quoted_path("/x\u{1b}[2J"), "/x\\u{1b}[2J");
        assert_eq!(quoted_path(&"y".repeat(1000)).len(), MAX_PATH_CHARS);
    }
}
