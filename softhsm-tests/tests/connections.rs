//! Connections from the attacker's side (threat model R3): a certificate
//! revoked, or expired, while its channel is open stops working on that
//! channel; connections and handshakes beyond their caps are refused. All
//! through the real server: custodyd in-process on a fresh SoftHSM2 token,
//! real gRPC and mTLS.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::time::Duration;

use custody_core::identity::Role;
use custody_daemon::devpki::{Issued, Validity};
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{Digest, ListKeysRequest, SignRequest, digest, sign_request};
use sha2::Digest as _;
use softhsm_tests::service::{TestService, create_key, reason, runtime};
use softhsm_tests::token_test;
use tonic::transport::Channel;

fn sign_request(n: u32) -> SignRequest {
    SignRequest {
        name: "keys/issuing".into(),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(
                sha2::Sha256::digest(n.to_be_bytes()).to_vec(),
            )),
        })),
        ..Default::default()
    }
}

async fn sign(channel: &Channel, n: u32) -> Result<(), tonic::Status> {
    SigningServiceClient::new(channel.clone())
        .sign(sign_request(n))
        .await
        .map(drop)
}

/// True if a call over `channel` was refused because its certificate no
/// longer counts: by the request check (`CERTIFICATE_NO_LONGER_VALID`), by
/// the connection being closed under the call (a transport error, which
/// tonic reports as UNKNOWN or CANCELLED), or by the channel's new handshake
/// being refused (UNAVAILABLE).
fn refused_for_its_certificate(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    let closed_under_the_call = status
        .source()
        .is_some_and(|source| source.is::<tonic::transport::Error>());
    match status.code() {
        tonic::Code::Unauthenticated => reason(status) == "CERTIFICATE_NO_LONGER_VALID",
        tonic::Code::Unavailable => true,
        _ => closed_under_the_call,
    }
}

/// Calls over `channel`, every one of which must be refused, until custodyd
/// has closed the channel's connection (it then has `open_after`
/// connections open); at most 200 calls. Returns the statuses seen.
async fn until_closed(
    service: &TestService,
    channel: &Channel,
    open_after: usize,
) -> Vec<tonic::Status> {
    let mut seen = Vec::new();
    for n in 0..200 {
        let status = sign(channel, 1000 + n)
            .await
            .expect_err("a call on the revoked certificate's channel succeeded");
        assert!(refused_for_its_certificate(&status), "{status:?}");
        seen.push(status);
        if service.open_connections() == open_after {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{} connections still open after 200 refused calls: {seen:?}",
        service.open_connections()
    );
}

fn signer(service: &TestService, validity: Validity) -> Issued {
    service
        .ca
        .issue_client("ca-issuing", &[Role::Signer], validity)
        .unwrap()
}

token_test!(
    fn r3_a_certificate_revoked_while_its_channel_is_open_is_refused_on_that_channel(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            // Two signers' channels, both open and signing before the
            // revocation; only the first certificate is revoked.
            let doomed = signer(&service, Validity::days(30));
            let kept = signer(&service, Validity::days(30));
            let doomed_channel = service.client_with(&doomed).await.unwrap();
            let kept_channel = service.client_with(&kept).await.unwrap();
            sign(&doomed_channel, 1).await.unwrap();
            sign(&kept_channel, 2).await.unwrap();
            assert_eq!(service.open_connections(), 3);

            // The CA revokes the first certificate; custodyd reloads (SIGHUP).
            let crl = service.ca.crl(&[&service.revoked, &doomed]).unwrap();
            std::fs::write(&service.config.tls.crls[0], crl).unwrap();
            service.reload_tls().unwrap();

            // From the reload on, no call on the open channel succeeds, and
            // the connection is closed (bounded wait, no timing assumed):
            // the operator's and the other signer's stay open.
            until_closed(&service, &doomed_channel, 2).await;
            // A new channel with the revoked certificate is refused too
            // (with TLS 1.3 the client may think it connected; its first
            // call fails) ...
            assert!(refused(&service, &doomed).await);
            // ... while the other signer's open channel carries on: the
            // reload closed only what no longer verifies.
            for n in 0..3 {
                sign(&kept_channel, 10 + n).await.unwrap();
            }
        });
    }
);

token_test!(
    fn r3_a_certificate_that_expires_while_its_channel_is_open_is_refused_on_that_channel(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            // Valid for a few more seconds: enough to connect and sign once.
            let now = time::OffsetDateTime::now_utc();
            let not_after = now + time::Duration::seconds(6);
            let short = signer(
                &service,
                Validity { not_before: now - time::Duration::hours(1), not_after },
            );
            let channel = service.client_with(&short).await.unwrap();
            sign(&channel, 1).await.unwrap();
            // Wait (bounded) until the certificate has expired: no reload,
            // no new handshake; the open channel is all the client has.
            for _ in 0..200 {
                if time::OffsetDateTime::now_utc() > not_after + time::Duration::seconds(1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(time::OffsetDateTime::now_utc() > not_after);
            // The next call on the open channel is refused, with a record
            // that names the certificate.
            let before = service.audit_len();
            let status = sign(&channel, 2).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            assert_eq!(reason(&status), "CERTIFICATE_NO_LONGER_VALID", "{status:?}");
            let events = service.audit_events_since(before);
            assert_eq!(events.len(), 1, "{events:?}");
            let event = &events[0];
            assert_eq!(event["method"], "Sign", "{event}");
            assert_eq!(event["principal"], "ca-issuing", "{event}");
            assert_eq!(event["outcome"], "CERTIFICATE_NO_LONGER_VALID", "{event}");
            let detail = event["detail"].as_str().unwrap();
            assert!(detail.contains(&hex::encode(sha2::Sha256::digest(&short.cert_der))), "{detail}");
            assert!(detail.contains(&hex::encode(&short.serial)), "{detail}");
            // A reload closes it; only the operator's connection stays.
            service.reload_tls().unwrap();
            until_closed(&service, &channel, 1).await;
        });
    }
);

/// True if a channel presenting `issued` can make no successful call.
async fn refused(service: &TestService, issued: &Issued) -> bool {
    let Ok(channel) = service.client_with(issued).await else {
        return true;
    };
    KeyServiceClient::new(channel)
        .list_keys(ListKeysRequest::default())
        .await
        .is_err()
}

/// Tries to connect as `issued` (at most 200 times, 25 ms apart) until a call
/// succeeds; returns the channel.
async fn connect_eventually(service: &TestService, issued: &Issued) -> Channel {
    for _ in 0..200 {
        if let Ok(channel) = service.client_with(issued).await {
            if KeyServiceClient::new(channel.clone())
                .list_keys(ListKeysRequest::default())
                .await
                .is_ok()
            {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no connection within 200 attempts");
}

token_test!(
    fn connections_and_handshakes_beyond_their_caps_are_refused(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.connections.max_connections = 2;
                config.connections.max_handshakes = 1;
            })
            .await;
            let auditor = service
                .ca
                .issue_client("auditor", &[Role::Auditor], Validity::days(1))
                .unwrap();
            let addr = service.url().trim_start_matches("https://localhost:").to_string();
            let addr = format!("127.0.0.1:{addr}");

            // A client that connects and never says hello holds the one
            // handshake slot: the next client is refused ...
            let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
            // (the server has accepted it once an honest client gets in line
            // behind it: accepts are handled in order)
            assert!(refused(&service, &auditor).await, "a handshake beyond the cap was served");
            // ... until the silent one goes away.
            drop(silent);
            let first = connect_eventually(&service, &auditor).await;

            // Two connections open: a third is refused ...
            let second = service.client_with(&auditor).await.unwrap();
            KeyServiceClient::new(second.clone()).list_keys(ListKeysRequest::default()).await.unwrap();
            assert!(refused(&service, &auditor).await, "a connection beyond the cap was served");
            // ... while the open ones carry on, and once one closes, a new
            // one gets in.
            KeyServiceClient::new(first.clone()).list_keys(ListKeysRequest::default()).await.unwrap();
            drop(second);
            let third = connect_eventually(&service, &auditor).await;
            KeyServiceClient::new(third).list_keys(ListKeysRequest::default()).await.unwrap();
        });
    }
);

token_test!(
    fn once_the_stop_begins_new_connections_are_refused_and_the_calls_in_flight_finish(token) {
        // Threat model R3: while custodyd drains, a new client is told "no"
        // by the kernel at once, not handshaken and then left on a
        // connection no one will read; a handshake under way is dropped; a
        // stream already open is served to its end.
        use tokio::io::AsyncReadExt as _;
        runtime().block_on(async {
            // Handshakes may last five minutes here, so only the stop can end
            // the silent one below within the test's minute; one at a time,
            // so a later connection's refusal shows that it was accepted.
            let mut service = TestService::start_with(token, |config| {
                config.connections.handshake_timeout_secs = 300;
                config.connections.max_handshakes = 1;
            })
            .await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            let ca = service.client("ca-issuing").await;
            let (items, waiting) = tokio::sync::mpsc::channel::<SignRequest>(4);
            let requests = futures_util::stream::unfold(waiting, |mut waiting| async move {
                waiting.recv().await.map(|item| (item, waiting))
            });
            let mut answers = SigningServiceClient::new(ca).sign_stream(requests).await.unwrap().into_inner();
            items.send(sign_request(1)).await.unwrap();
            assert!(answers.message().await.unwrap().unwrap().error.is_none());
            // A client in its handshake (it has sent nothing yet). The
            // listener takes connections in order and this one holds the
            // only handshake place: the next is closed at once, and when it
            // is, this one has been accepted.
            let mut handshaking = tokio::net::TcpStream::connect(service.addr()).await.unwrap();
            let mut probe = tokio::net::TcpStream::connect(service.addr()).await.unwrap();
            let mut byte = [0u8; 1];
            let probed = tokio::time::timeout(Duration::from_secs(60), probe.read(&mut byte)).await;
            assert!(matches!(probed, Ok(Ok(0) | Err(_))), "the probe was not refused: {probed:?}");

            service.begin_stop();
            // Bounded wait for the listening socket to close (the stop runs
            // on the server's task).
            let mut refused = false;
            for _ in 0..400 {
                if tokio::net::TcpStream::connect(service.addr()).await.is_err() {
                    refused = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(refused, "custodyd still takes connections after its stop began");
            // The handshake under way is closed, not left to its timeout.
            let read = tokio::time::timeout(Duration::from_secs(60), handshaking.read(&mut byte)).await;
            assert!(
                matches!(read, Ok(Ok(0) | Err(_))),
                "a handshake under way was left open after the stop began: {read:?}"
            );

            // The stream in flight is still served, and ends when its client
            // ends it; then the stop completes.
            items.send(sign_request(2)).await.unwrap();
            assert!(answers.message().await.unwrap().unwrap().error.is_none());
            drop(items);
            assert!(answers.message().await.unwrap().is_none());
            service.stop().await;
        });
    }
);
