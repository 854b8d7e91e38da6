//! Bounded work per caller (threat model R2), attacked through the real
//! server: custodyd in-process on a fresh SoftHSM2 token, real gRPC and
//! mTLS, the clock injected.
//!
//! A caller who asks for work without end is stopped at a cap, with a
//! `RESOURCE_EXHAUSTED` status that names the cap and says when to try
//! again, while other callers carry on: pending operations per requester,
//! open ceremonies per officer, HSM jobs waiting for a worker. Drift checks
//! and audit verifications run one at a time. Finished operations leave
//! the store after the retention period, and lists come a bounded page at
//! a time.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use custody_core::config::Config;
use custody_core::identity::Role;
use custody_core::operations::vote::expire_due;
use custody_proto::v1::audit_service_client::AuditServiceClient;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    AbortCeremonyRequest, CheckDriftRequest, CreateKeyRequest, Digest, GetOperationRequest,
    KeyPurpose, KeyRef, ListOperationsRequest, Operation, OperationKind, OperationState,
    SignRequest, StartCeremonyRequest, VerifyAuditRequest, VerifyRequest, digest, operation_spec,
    sign_request, verify_request,
};
use sha2::Digest as _;
use softhsm_tests::ceremony::root_script;
use softhsm_tests::service::{
    HeldWorker, TestService, create_key, reason, request_operation, runtime, sign_in_one_stream,
    sign_sha256,
};
use softhsm_tests::{TestToken, token_test};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn rotate(key: &str) -> operation_spec::Spec {
    operation_spec::Spec::Rotate(KeyRef {
        name: format!("keys/{key}"),
    })
}

/// The retry hint of a refusal.
fn retry_after(status: &tonic::Status) -> Duration {
    status
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"))
}

/// Every page of `ListOperations` as the caller of `channel`, `page_size`
/// at a time.
async fn list_all(channel: &Channel, state: OperationState, page_size: i32) -> Vec<Operation> {
    let mut client = OperationServiceClient::new(channel.clone());
    let (mut all, mut page_token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_operations(ListOperationsRequest {
                state: state as i32,
                page_size,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.operations.len() <= page_size as usize);
        all.extend(page.operations);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

token_test!(
    fn a_requester_at_its_pending_cap_is_refused_while_others_still_request(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.dual_control.max_pending_per_requester = 3;
            })
            .await;
            let operator = service.client("operator").await;
            create_key(&operator, "k", "EC_SIGN_P256_SHA256", None).await;
            service.gate("k", OperationKind::Rotate).await;
            let mut mine = Vec::new();
            for _ in 0..3 {
                mine.push(request_operation(&operator, rotate("k")).await.unwrap());
            }

            // The fourth is refused, says why and when to try again, is
            // audited once, and stores nothing.
            let stored = service.state().dual_control.operations().unwrap().len();
            let before = service.audit_len();
            let refused = request_operation(&operator, rotate("k")).await.unwrap_err();
            assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
            assert_eq!(reason(&refused), "TOO_MANY_PENDING");
            assert!(refused.message().contains("max_pending_per_requester 3"), "{}", refused.message());
            // The clock stands still: the first of the three expires in
            // exactly the approval window (600 s).
            assert_eq!(retry_after(&refused), Duration::from_secs(600));
            assert_eq!(service.state().dual_control.operations().unwrap().len(), stored);
            let events = service.audit_events_since(before);
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(
                (&events[0]["method"], &events[0]["principal"], &events[0]["outcome"]),
                (&"RequestOperation".into(), &"operator".into(), &"TOO_MANY_PENDING".into())
            );
            // A fresh certificate of the same principal is the same requester.
            let again = service.client("operator").await;
            assert_eq!(reason(&request_operation(&again, rotate("k")).await.unwrap_err()), "TOO_MANY_PENDING");

            // Others still request: another operator, up to their own cap.
            let other = service.client_as("operator-2", &[Role::Operator]).await;
            for _ in 0..3 {
                let asked = request_operation(&other, rotate("k")).await.unwrap();
                assert_eq!(asked.state, OperationState::Pending as i32);
            }
            assert_eq!(reason(&request_operation(&other, rotate("k")).await.unwrap_err()), "TOO_MANY_PENDING");

            // Once one of the operator's is decided (a denial), they may ask again.
            let deny = service.vote_for("alice", &mine[0], false);
            let alice = service.client_as("alice", &[Role::Officer]).await;
            OperationServiceClient::new(alice).deny_operation(deny).await.unwrap();
            request_operation(&operator, rotate("k")).await.unwrap();
            assert_eq!(reason(&request_operation(&operator, rotate("k")).await.unwrap_err()), "TOO_MANY_PENDING");
            // Once they expire, too.
            service.clock.advance(600_000);
            expire_due(service.state()).await;
            for _ in 0..3 {
                request_operation(&operator, rotate("k")).await.unwrap();
            }
        });
    }
);

token_test!(
    fn list_operations_comes_in_bounded_pages_that_cover_each_operation_once(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.dual_control.max_pending_per_requester = 100;
            })
            .await;
            let operator = service.client("operator").await;
            let other = service.client_as("operator-2", &[Role::Operator]).await;
            create_key(&operator, "k", "EC_SIGN_P256_SHA256", None).await;
            service.gate("k", OperationKind::Rotate).await;
            for n in 0..30 {
                service.clock.advance(1);
                let channel = if n % 6 == 5 { &other } else { &operator };
                request_operation(channel, rotate("k")).await.unwrap();
            }
            let everything: BTreeSet<String> = service
                .state()
                .dual_control
                .operations()
                .unwrap()
                .into_iter()
                .map(|o| format!("operations/{}", o.id))
                .collect();
            assert_eq!(everything.len(), 31, "30 rotations and the policy change");

            // An officer pages through all of them, newest first, each once.
            let alice = service.client_as("alice", &[Role::Officer]).await;
            for page_size in [1, 7, 31, 1000] {
                let listed = list_all(&alice, OperationState::Unspecified, page_size).await;
                let names: Vec<&String> = listed.iter().map(|o| &o.name).collect();
                assert_eq!(names.len(), 31, "page size {page_size}");
                assert_eq!(names.iter().copied().cloned().collect::<BTreeSet<_>>(), everything);
                let times: Vec<_> = listed
                    .iter()
                    .map(|o| o.create_time.unwrap())
                    .map(|t| (t.seconds, t.nanos))
                    .collect();
                assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
            }
            let pending = list_all(&alice, OperationState::Pending, 4).await;
            assert_eq!(pending.len(), 30);
            assert!(pending.iter().all(|o| o.state == OperationState::Pending as i32));
            assert_eq!(list_all(&alice, OperationState::Succeeded, 4).await.len(), 1);

            // The operator pages through its own only: 25 and its policy change.
            let own = list_all(&operator, OperationState::Unspecified, 10).await;
            assert_eq!(own.len(), 26);
            assert!(own.iter().all(|o| o.requester == "operator"));
            let own_pending = list_all(&other, OperationState::Pending, 2).await;
            assert_eq!(own_pending.len(), 5);
            assert!(own_pending.iter().all(|o| o.requester == "operator-2"));

            // Pages beyond the bound and tokens this service did not issue
            // are refused, not clamped or ignored.
            let mut client = OperationServiceClient::new(alice.clone());
            for (page_size, page_token, why) in [
                (1001, String::new(), "BAD_PAGE_SIZE"),
                (-1, String::new(), "BAD_PAGE_SIZE"),
                (10, "not-a-token".to_string(), "BAD_PAGE_TOKEN"),
                (10, "00".repeat(40), "BAD_PAGE_TOKEN"),
            ] {
                let refused = client
                    .list_operations(ListOperationsRequest { state: 0, page_size, page_token })
                    .await
                    .unwrap_err();
                assert_eq!((refused.code(), reason(&refused).as_str()), (Code::InvalidArgument, why));
            }
        });
    }
);

token_test!(
    fn finished_operations_leave_the_store_after_the_retention_period(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.dual_control.operation_retention_secs = 3600;
            })
            .await;
            let operator = service.client("operator").await;
            create_key(&operator, "k", "EC_SIGN_P256_SHA256", None).await;
            service.gate("k", OperationKind::Rotate).await;
            let denied = request_operation(&operator, rotate("k")).await.unwrap();
            let alice = service.client_as("alice", &[Role::Officer]).await;
            let mut officer = OperationServiceClient::new(alice);
            officer.deny_operation(service.vote_for("alice", &denied, false)).await.unwrap();
            service.clock.advance(1000);
            let waiting = request_operation(&operator, rotate("k")).await.unwrap();
            let get = |name: &str| GetOperationRequest { name: name.into() };

            // When the retention period has just run: kept.
            service.clock.advance(3_600_000 - 1000);
            expire_due(service.state()).await;
            let kept = officer.get_operation(get(&denied.name)).await.unwrap().into_inner();
            assert_eq!(kept.state, OperationState::Denied as i32);
            // The pending one expired meanwhile, and is kept from then on.
            let expired = officer.get_operation(get(&waiting.name)).await.unwrap().into_inner();
            assert_eq!(expired.state, OperationState::Expired as i32);

            // One millisecond later: pruned, and the audit log says which.
            let before = service.audit_len();
            service.clock.advance(1);
            expire_due(service.state()).await;
            let gone = officer.get_operation(get(&denied.name)).await.unwrap_err();
            assert_eq!(reason(&gone), "NOT_FOUND");
            assert!(officer.get_operation(get(&waiting.name)).await.is_ok());
            let events = service.audit_events_since(before);
            let id = denied.name.trim_start_matches("operations/");
            let pruned: Vec<_> = events.iter().filter(|e| e["method"] == "PruneOperations").collect();
            assert_eq!(pruned.len(), 2, "intent and outcome: {events:?}");
            assert!(pruned.iter().all(|e| e["detail"].as_str().unwrap().contains(id)));
            assert_eq!(pruned[1]["outcome"], "ok");
            // Its story stays in the audit log: the request, the vote, the end.
            let story = service
                .state()
                .audit
                .records(1)
                .map(|r| String::from_utf8(r.unwrap().entry).unwrap())
                .filter(|entry| entry.contains(id))
                .count();
            assert!(story >= 4, "{story} records name {id}");
            let listed = list_all(&operator, OperationState::Unspecified, 100).await;
            assert!(listed.iter().all(|o| o.name != denied.name));
        });
    }
);

token_test!(
    fn a_full_hsm_queue_refuses_callers_with_a_retry_hint_and_drains(token) {
        runtime().block_on(async {
            let (service, _, signer) = one_worker_and_key(token, |config| {
                config.hsm.max_queued_jobs = 1;
            }).await;
            let sign = || SignRequest {
                name: "keys/k".into(),
                input: Some(sign_request::Input::Digest(Digest {
                    digest: Some(digest::Digest::Sha256(sha2::Sha256::digest(b"tbs").to_vec())),
                })),
                ..Default::default()
            };
            SigningServiceClient::new(signer.clone()).sign(sign()).await.unwrap();

            // The one worker busy, and one job waiting: the queue is full.
            let hsm = service.state().hsm.clone();
            let held = Held::worker_and_one_waiting(&hsm).await;

            let before = service.audit_len();
            let refused = SigningServiceClient::new(signer.clone()).sign(sign()).await.unwrap_err();
            assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
            assert_eq!(reason(&refused), "HSM_BUSY");
            assert_eq!(retry_after(&refused), Duration::from_millis(500));
            let events = service.audit_events_since(before);
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(events[0]["outcome"], "HSM_BUSY");
            assert_eq!(hsm.queued(), 1, "the refused request queued nothing");

            // Released, the queue drains and callers are served again.
            held.release().await;
            SigningServiceClient::new(signer).sign(sign()).await.unwrap();
        });
    }
);

/// custodyd with one HSM worker (and `configure`'s settings) and the EC
/// key `k`, which `ca-issuing` signs with: the service, the operator's
/// channel and the signer's.
async fn one_worker_and_key(
    token: &TestToken,
    configure: impl FnOnce(&mut Config),
) -> (TestService, Channel, Channel) {
    let service = TestService::start_with(token, |config| {
        config.hsm.workers = 1;
        configure(config);
    })
    .await;
    let operator = service.client("operator").await;
    create_key(&operator, "k", "EC_SIGN_P256_SHA256", None).await;
    let signer = service.client("ca-issuing").await;
    (service, operator, signer)
}

/// Waits until at least `requests` requests wait for an HSM worker (10 s
/// at most).
async fn until_queued(hsm: &hsm_shim::Hsm, requests: usize) {
    for _ in 0..200 {
        if hsm.queued() >= requests {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How far the HSM queue fills beyond `before`: once it has grown, the
/// most it held before it stopped growing for half a second (10 s at most
/// for each wait).
async fn queue_filled(hsm: &hsm_shim::Hsm, before: usize) -> usize {
    for _ in 0..200 {
        if hsm.queued() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut most = hsm.queued();
    let mut unchanged = 0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = hsm.queued();
        unchanged = if now == most { unchanged + 1 } else { 0 };
        most = most.max(now);
        if unchanged == 10 {
            break;
        }
    }
    most
}

/// `count` stream items signing distinct SHA-256 digests with `name`,
/// numbered from 0.
fn stream_items(name: &str, count: u64) -> Vec<SignRequest> {
    (0..count)
        .map(|i| SignRequest {
            name: name.into(),
            input: Some(sign_request::Input::Digest(Digest {
                digest: Some(digest::Digest::Sha256(
                    sha2::Sha256::digest(i.to_be_bytes()).to_vec(),
                )),
            })),
            request_id: i,
            ..Default::default()
        })
        .collect()
}

/// The HSM's one worker held by a job, and one job waiting behind it.
struct Held {
    worker: HeldWorker,
    waiting: tokio::task::JoinHandle<Result<(), hsm_shim::HsmError>>,
}

impl Held {
    async fn worker_and_one_waiting(hsm: &hsm_shim::Hsm) -> Held {
        let worker = HeldWorker::hold(hsm).await;
        let waiting = tokio::spawn({
            let hsm = hsm.clone();
            async move { hsm.run(|_| Ok(())).await }
        });
        while hsm.queued() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Held { worker, waiting }
    }

    /// Lets the held job end, and the waiting one run.
    async fn release(self) {
        self.worker.release().await;
        self.waiting.await.unwrap().unwrap();
    }
}

token_test!(
    fn one_caller_cannot_take_the_hsm_queue_from_another(token) {
        // Threat model R2: the HSM queue is shared first come, first
        // served; each caller's requests waiting or running are held to
        // its share, so one caller's streams and calls cannot fill it and
        // leave another caller HSM_BUSY. A stream waits for its share; a
        // unary call past it is refused.
        runtime().block_on(async {
            let (service, operator, greedy) = one_worker_and_key(token, |config| {
                // Small enough for one caller's streams to fill it.
                config.hsm.max_queued_jobs = 100;
                config.hsm.max_queued_per_caller = 40;
            }).await;
            KeyServiceClient::new(operator.clone())
                .create_key(CreateKeyRequest {
                    key_id: "k2".into(),
                    algorithm: custody_daemon::wire::algorithm(
                        custody_core::algorithms::KeyAlgorithm::EcSignP256Sha256,
                    ) as i32,
                    purpose: KeyPurpose::AsymmetricSign as i32,
                    allowed_signers: vec!["ca-second".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
            let other = service.client_as("ca-second", &[Role::Signer]).await;
            let hsm = service.state().hsm.clone();
            let held = Held::worker_and_one_waiting(&hsm).await;
            let before = hsm.queued();

            // Three streams of 200 items: 384 places with windows alone,
            // past the whole queue's 100.
            let streams: Vec<_> = (0..3)
                .map(|_| tokio::spawn(sign_in_one_stream(greedy.clone(), stream_items("keys/k", 200))))
                .collect();
            let most = queue_filled(&hsm, before).await;
            let greedys = most - before;
            assert!(greedys <= 40, "one caller holds {greedys} places of the HSM queue");
            assert!(greedys >= 16, "the streams queued only {greedys} items");

            // Another caller still queues, and is served.
            let served = tokio::spawn({
                let other = other.clone();
                async move { sign_sha256(&other, "k2", b"mine").await }
            });
            for _ in 0..200 {
                if hsm.queued() > most || served.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(hsm.queued(), most + 1, "the other caller's request is queued");

            held.release().await;
            assert!(!served.await.unwrap().unwrap().is_empty(), "the other caller signed");
            // The streams waited for their share rather than failing.
            for stream in streams {
                let answers = stream.await.unwrap();
                let ids: Vec<u64> = answers.iter().map(|a| a.request_id).collect();
                assert_eq!(ids, (0..200).collect::<Vec<_>>());
                assert!(
                    answers.iter().all(|a| a.error.is_none()),
                    "{:?}",
                    answers.iter().find(|a| a.error.is_some())
                );
            }

            // Unary calls: as many as the share queue, the next is refused
            // at once, and another caller's still queues.
            let held = Held::worker_and_one_waiting(&hsm).await;
            let before = hsm.queued();
            let calls: Vec<_> = (0..40u8)
                .map(|i| {
                    let greedy = greedy.clone();
                    tokio::spawn(async move { sign_sha256(&greedy, "k", &[i]).await })
                })
                .collect();
            until_queued(&hsm, before + 40).await;
            assert_eq!(hsm.queued(), before + 40, "the share's 40 calls queued");
            let refused = sign_sha256(&greedy, "k", b"one more").await.unwrap_err();
            assert_eq!(reason(&refused), "HSM_BUSY", "{refused:?}");
            let served = tokio::spawn(async move { sign_sha256(&other, "k2", b"mine").await });
            until_queued(&hsm, before + 41).await;
            assert_eq!(hsm.queued(), before + 41, "the other caller's call is queued");
            held.release().await;
            for call in calls {
                call.await.unwrap().unwrap();
            }
            served.await.unwrap().unwrap();
        });
    }
);

token_test!(
    fn a_cancelled_call_keeps_its_share_until_its_hsm_job_has_run(token) {
        // Threat model R2: a caller that cancels its calls leaves their HSM
        // jobs queued, and those jobs keep the caller's share: cancelling
        // and calling again does not fill the queue past the share.
        runtime().block_on(async {
            let (service, _, caller) = one_worker_and_key(token, |config| {
                config.hsm.max_queued_per_caller = 40;
            }).await;
            let verify = |caller: Channel| async move {
                SigningServiceClient::new(caller)
                    .verify(VerifyRequest {
                        name: "keys/k".into(),
                        input: Some(verify_request::Input::Digest(Digest {
                            digest: Some(digest::Digest::Sha256(vec![7; 32])),
                        })),
                        signature: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
                        ..Default::default()
                    })
                    .await
            };
            let hsm = service.state().hsm.clone();
            let held = Held::worker_and_one_waiting(&hsm).await;
            let before = hsm.queued();
            // Verify answers in the caller's own task: cancelling the call
            // drops its handler.
            let calls: Vec<_> = (0..40)
                .map(|_| tokio::spawn(verify(caller.clone())))
                .collect();
            until_queued(&hsm, before + 40).await;
            assert_eq!(hsm.queued(), before + 40, "the share's 40 calls queued");
            for call in &calls {
                call.abort();
            }
            for call in calls {
                assert!(call.await.unwrap_err().is_cancelled());
            }
            // The server has seen the cancellations (each a stream reset).
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(hsm.queued(), before + 40, "the cancelled calls' jobs stay queued");
            let again = tokio::time::timeout(Duration::from_secs(5), verify(caller.clone())).await;
            let refused = again
                .expect("refused at once, not queued behind the held worker")
                .unwrap_err();
            assert_eq!(reason(&refused), "HSM_BUSY", "{refused:?}");
            held.release().await;
            // Once the jobs have run, the share is free again.
            for _ in 0..200 {
                if hsm.queued() == 0 && service.state().limits.hsm_shares.held("ca-issuing") == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(verify(caller).await.is_ok());
        });
    }
);

token_test!(
    fn a_stream_holds_no_more_of_the_hsm_queue_than_its_window(token) {
        // Threat model R2: however many items a client sends down one
        // SignStream, custodyd reads on only while fewer than its window
        // (128) are in flight, so one stream holds at most that many places
        // of the HSM queue; the rest wait, unread, in the transport.
        runtime().block_on(async {
            let (service, _, signer) = one_worker_and_key(token, |_| {}).await;
            let hsm = service.state().hsm.clone();
            let held = Held::worker_and_one_waiting(&hsm).await;

            // The job `held` keeps waiting, and nothing else.
            let before = hsm.queued();
            let items = 1000u64;
            let requests = stream_items("keys/k", items);
            let stream = tokio::spawn(sign_in_one_stream(signer, requests));
            // The queue fills as far as the stream is let to fill it.
            let most = queue_filled(&hsm, before).await;
            let from_stream = most - before;
            assert!(
                from_stream <= 128,
                "one stream held {from_stream} places of the HSM queue"
            );
            // Eight batches in flight, each of at least one item.
            assert!(from_stream >= 8, "the stream queued {from_stream} items behind the held worker");
            held.release().await;
            let answers = stream.await.unwrap();
            let ids: Vec<u64> = answers.iter().map(|a| a.request_id).collect();
            assert_eq!(ids, (0..items).collect::<Vec<_>>(), "every item answered, in order");
            assert!(answers.iter().all(|a| a.error.is_none() && !a.signature.is_empty()));
        });
    }
);

token_test!(
    fn a_streams_batch_counts_each_of_its_signatures_against_the_hsm_queue(token) {
        // Threat model R2 with D5: a batch of a stream's items takes as
        // many places in the HSM queue as it holds signatures, so batching
        // buys no deeper queue than unary callers get.
        runtime().block_on(async {
            let (service, _, signer) = one_worker_and_key(token, |config| {
                config.hsm.max_queued_jobs = 2;
            }).await;
            let hsm = service.state().hsm.clone();
            let held = Held::worker_and_one_waiting(&hsm).await;

            // One place is left: a batch of more than one signature does
            // not fit in it.
            let requests = stream_items("keys/k", 16);
            let stream = tokio::spawn(sign_in_one_stream(signer, requests));
            // Every item answered or queued before the worker is let go.
            while !stream.is_finished() && hsm.queued() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            held.release().await;
            let answers = stream.await.unwrap();
            assert_eq!(answers.len(), 16);
            let signed = answers.iter().filter(|a| a.error.is_none()).count();
            let busy = answers
                .iter()
                .filter(|a| a.error.as_ref().is_some_and(|e| e.reason == "HSM_BUSY"))
                .count();
            assert!(signed <= 1, "{signed} signed through one free place in the queue");
            assert_eq!(signed + busy, 16, "{answers:?}");
        });
    }
);

token_test!(
    fn one_drift_check_and_one_audit_verification_run_at_a_time_and_drift_takes_no_lock(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "k", "EC_SIGN_P256_SHA256", None).await;
            let auditor = service.client("auditor").await;
            let state = service.state().clone();

            // While one drift check runs, the next waits its turn (and the
            // scheduler's would be skipped): at most one scan at a time.
            let running = state.limits.drift.start().await;
            let next = tokio::spawn({
                let mut keys = KeyServiceClient::new(operator.clone());
                async move { keys.check_drift(CheckDriftRequest {}).await }
            });
            while state.limits.drift.waiting() < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(!next.is_finished(), "a second drift check ran beside the first");
            assert!(custody_core::drift::check_unless_running(&state).await.is_none());
            drop(running);
            let report = next.await.unwrap().unwrap().into_inner();
            assert!(report.findings.is_empty(), "{:?}", report.findings);

            // The same for verifying the audit log.
            let running = state.limits.audit_verify.start().await;
            let next = tokio::spawn({
                let mut audit = AuditServiceClient::new(auditor.clone());
                async move { audit.verify_audit(VerifyAuditRequest {}).await }
            });
            while state.limits.audit_verify.waiting() < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(!next.is_finished(), "a second verification ran beside the first");
            drop(running);
            let verified = next.await.unwrap().unwrap().into_inner();
            assert!(verified.valid, "{}", verified.problem);

            // A drift check no longer waits for the registry lock: it
            // completes while a key change holds it (before, it waited
            // for the change, and every change waited for the full scan).
            // The timeout only turns a deadlock into a failure.
            let held = state.registry.lock().await.unwrap();
            let report = tokio::time::timeout(
                Duration::from_secs(120),
                KeyServiceClient::new(operator.clone()).check_drift(CheckDriftRequest {}),
            )
            .await
            .expect("the drift check waited for the registry lock")
            .unwrap()
            .into_inner();
            drop(held);
            assert!(report.findings.is_empty(), "{:?}", report.findings);
            assert_eq!(report.versions_checked, 1);
        });
    }
);

token_test!(
    fn an_officer_at_the_open_ceremony_cap_is_refused_while_another_opens(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.ceremony.max_open_per_officer = 1;
            })
            .await;
            let start = |id: &str| StartCeremonyRequest {
                script: root_script(id, &format!("{id}-root"), false),
                bundle: String::new(),
                csr: Vec::new(),
                certificate: Vec::new(),
            };
            let mut alice = CeremonyServiceClient::new(service.client_as("alice", &[Role::Officer]).await);
            let mut bob = CeremonyServiceClient::new(service.client_as("bob", &[Role::Officer]).await);
            alice.start_ceremony(start("c1")).await.unwrap();
            let refused = alice.start_ceremony(start("c2")).await.unwrap_err();
            assert_eq!((refused.code(), reason(&refused).as_str()), (Code::ResourceExhausted, "TOO_MANY_CEREMONIES"));
            assert!(refused.message().contains("max_open_per_officer 1"), "{}", refused.message());
            assert!(service.state().ceremonies.journal.get("c2").unwrap().is_none());
            // Another officer opens one.
            bob.start_ceremony(start("c2")).await.unwrap();
            // Once alice's ceremony is over, she may open another.
            alice
                .abort_ceremony(AbortCeremonyRequest { name: "ceremonies/c1".into(), reason: "done".into() })
                .await
                .unwrap();
            alice.start_ceremony(start("c3")).await.unwrap();
        });
    }
);
