//! Key lifecycle on a real token through the real gRPC server: the NIST SP
//! 800-57 state machine against a reference model, cryptoperiods and the
//! scheduler, compromise, quorum-gated scheduled destruction, legal holds,
//! and drift detection after changes behind custodyd's back.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use custody_core::clock::Clock;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CheckDriftRequest, DecryptRequest, Digest, DriftKind, EncryptRequest, GetKeyRequest, Key,
    KeyVersionState, OperationKind, OperationState, RotateKeyRequest, SetKeyVersionStateRequest,
    SetLegalHoldRequest, SetStateSpec, SignRequest, UpdateKeyRequest, VerifyRequest, VersionRef,
    digest, operation_spec, sign_request, verify_request,
};
use softhsm_tests::service::{TestService, create_key, reason, request_operation, runtime};
use softhsm_tests::token_test;
use tonic::transport::Channel;

const HOUR_MS: i64 = 3600 * 1000;

async fn create(
    operator: &Channel,
    key_id: &str,
    algorithm: &str,
    cryptoperiod_secs: Option<i64>,
) -> Key {
    create_key(operator, key_id, algorithm, cryptoperiod_secs).await
}

async fn get(operator: &Channel, key_id: &str) -> Key {
    KeyServiceClient::new(operator.clone())
        .get_key(GetKeyRequest {
            name: format!("keys/{key_id}"),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn set_state(
    operator: &Channel,
    name: &str,
    state: KeyVersionState,
    why: &str,
) -> Result<custody_proto::v1::KeyVersion, tonic::Status> {
    KeyServiceClient::new(operator.clone())
        .set_key_version_state(SetKeyVersionStateRequest {
            name: name.into(),
            state: state as i32,
            reason: why.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn digest_request(name: &str) -> SignRequest {
    SignRequest {
        name: name.into(),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(vec![7; 32])),
        })),
        ..Default::default()
    }
}

async fn sign(ca: &Channel, name: &str) -> Result<(), tonic::Status> {
    SigningServiceClient::new(ca.clone())
        .sign(digest_request(name))
        .await
        .map(drop)
}

async fn verify(ca: &Channel, name: &str) -> Result<(), tonic::Status> {
    SigningServiceClient::new(ca.clone())
        .verify(VerifyRequest {
            name: name.into(),
            input: Some(verify_request::Input::Digest(Digest {
                digest: Some(digest::Digest::Sha256(vec![7; 32])),
            })),
            signature: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
            ..Default::default()
        })
        .await
        .map(drop)
}

/// Polls `check` until it holds, for up to ten seconds (the scheduler
/// ticks every second in tests).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 10 s: {what}");
}

/// The reference model: NIST SP 800-57 Part 1 transitions and uses, written
/// out as tables independently of `custody_core::lifecycle`.
mod model {
    use custody_proto::v1::KeyVersionState as S;

    pub(crate) fn transition(from: S, to: S) -> bool {
        const ALLOWED: [(S, S); 10] = [
            (S::PreActivation, S::Active),
            (S::PreActivation, S::Compromised),
            (S::Active, S::Suspended),
            (S::Active, S::Deactivated),
            (S::Active, S::Compromised),
            (S::Suspended, S::Active),
            (S::Suspended, S::Deactivated),
            (S::Suspended, S::Compromised),
            (S::Deactivated, S::Compromised),
            (S::Compromised, S::Destroyed),
        ];
        // Destruction is never a state change request.
        to != S::Destroyed && ALLOWED.contains(&(from, to))
    }

    /// Sign or encrypt.
    pub(crate) fn protects(state: S) -> bool {
        state == S::Active
    }

    /// Verify or decrypt.
    pub(crate) fn processes(state: S) -> bool {
        matches!(state, S::Active | S::Suspended | S::Deactivated)
    }
}

/// What the model expects of one key.
struct Modelled {
    key_id: String,
    states: BTreeMap<u32, KeyVersionState>,
    primary: u32,
    /// The primary version the key retired at (deactivated with nothing
    /// else in use), while it stays primary.
    retired: Option<u32>,
    ciphertexts: BTreeMap<u32, Vec<u8>>,
}

#[derive(Default, Debug)]
struct Tally {
    steps: usize,
    transitions_accepted: usize,
    transitions_refused: usize,
    illegal_transitions_accepted: usize,
    uses_allowed: usize,
    uses_refused: usize,
    uses_by_wrong_state: usize,
    disagreements: Vec<String>,
}

/// A small deterministic generator, so a failing sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const STATES: [KeyVersionState; 6] = [
    KeyVersionState::PreActivation,
    KeyVersionState::Active,
    KeyVersionState::Suspended,
    KeyVersionState::Deactivated,
    KeyVersionState::Compromised,
    KeyVersionState::Destroyed,
];

async fn model_step(
    rng: &mut Rng,
    operator: &Channel,
    ca: &Channel,
    key: &mut Modelled,
    tally: &mut Tally,
) {
    tally.steps += 1;
    let signing = key.key_id.starts_with("sig");
    let versions: Vec<u32> = key.states.keys().copied().collect();
    let version = versions[rng.below(versions.len() as u64) as usize];
    let name = format!("keys/{}/versions/{version}", key.key_id);
    let state = key.states[&version];
    match rng.below(10) {
        0..=3 => {
            let target = STATES[rng.below(STATES.len() as u64) as usize];
            // The primary goes out of use only as the key's retirement:
            // with no other version active or suspended.
            let others_in_use = key.states.iter().any(|(v, s)| {
                *v != version && matches!(s, KeyVersionState::Active | KeyVersionState::Suspended)
            });
            let expected = model::transition(state, target)
                && !(target == KeyVersionState::Deactivated
                    && version == key.primary
                    && others_in_use);
            let result = set_state(operator, &name, target, "model test").await;
            match (&result, expected) {
                (Ok(_), true) => {
                    tally.transitions_accepted += 1;
                    key.states.insert(version, target);
                    let retired = key.retired == Some(key.primary);
                    if target == KeyVersionState::Deactivated && version == key.primary {
                        key.retired = Some(version);
                    }
                    if target == KeyVersionState::Compromised && version == key.primary && !retired
                    {
                        // A compromised primary version forces a rotation,
                        // unless the key is retired.
                        let next = key.states.keys().max().unwrap() + 1;
                        key.states.insert(next, KeyVersionState::Active);
                        key.primary = next;
                    }
                }
                (Err(status), false) => {
                    tally.transitions_refused += 1;
                    let why = reason(status);
                    if !matches!(why.as_str(), "ILLEGAL_TRANSITION" | "PRIMARY_VERSION") {
                        tally
                            .disagreements
                            .push(format!("{name} {state:?}->{target:?}: refused with {why}"));
                    }
                }
                (Ok(_), false) => {
                    tally.illegal_transitions_accepted += 1;
                    tally
                        .disagreements
                        .push(format!("{name} {state:?}->{target:?} accepted"));
                }
                (Err(status), true) => tally
                    .disagreements
                    .push(format!("{name} {state:?}->{target:?} refused: {status:?}")),
            }
        }
        4 => {
            let rotated = KeyServiceClient::new(operator.clone())
                .rotate_key(RotateKeyRequest {
                    name: format!("keys/{}", key.key_id),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            key.primary = rotated.primary_version;
            key.states
                .insert(rotated.primary_version, KeyVersionState::Active);
        }
        use_kind => {
            let protect = use_kind % 2 == 0;
            let allowed = if protect {
                model::protects(state)
            } else {
                model::processes(state)
            };
            let result = match (signing, protect) {
                (true, true) => sign(ca, &name).await,
                (true, false) => verify(ca, &name).await,
                (false, true) => {
                    // Encryption always uses the primary version.
                    let primary = key.primary;
                    let allowed = model::protects(key.states[&primary]);
                    let result = EnvelopeServiceClient::new(ca.clone())
                        .encrypt(EncryptRequest {
                            name: format!("keys/{}", key.key_id),
                            plaintext: b"model".to_vec(),
                            associated_data: vec![],
                        })
                        .await;
                    record_use(
                        tally,
                        &format!("encrypt under v{primary}"),
                        allowed,
                        result.is_ok(),
                    );
                    if let Ok(response) = result {
                        key.ciphertexts
                            .insert(primary, response.into_inner().ciphertext);
                    }
                    return;
                }
                (false, false) => {
                    let Some(ciphertext) = key.ciphertexts.get(&version) else {
                        return;
                    };
                    EnvelopeServiceClient::new(ca.clone())
                        .decrypt(DecryptRequest {
                            name: format!("keys/{}", key.key_id),
                            ciphertext: ciphertext.clone(),
                            associated_data: vec![],
                        })
                        .await
                        .map(drop)
                }
            };
            record_use(
                tally,
                &format!("{name} {state:?} protect={protect}"),
                allowed,
                result.is_ok(),
            );
        }
    }
}

fn record_use(tally: &mut Tally, what: &str, allowed: bool, succeeded: bool) {
    match (allowed, succeeded) {
        (true, true) => tally.uses_allowed += 1,
        (false, false) => tally.uses_refused += 1,
        (false, true) => {
            tally.uses_by_wrong_state += 1;
            tally
                .disagreements
                .push(format!("{what}: used against the model"));
        }
        (true, false) => tally
            .disagreements
            .push(format!("{what}: refused against the model")),
    }
}

token_test!(
    fn random_lifecycle_sequences_match_the_nist_reference_model(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let ca = service.client("ca-issuing").await;
            let mut tally = Tally::default();
            for (run, seed) in [0x9e37_79b9_7f4a_7c15_u64, 0xdead_beef_cafe_f00d, 0x0123_4567_89ab_cdef, 42].into_iter().enumerate() {
                for (kind, algorithm) in [("sig", "EC_SIGN_P256_SHA256"), ("enc", "AES_256_GCM")] {
                    let key_id = format!("{kind}-{run}");
                    create(&operator, &key_id, algorithm, None).await;
                    let mut key = Modelled {
                        key_id,
                        states: BTreeMap::from([(1, KeyVersionState::Active)]),
                        retired: None,
                        primary: 1,
                        ciphertexts: BTreeMap::new(),
                    };
                    let mut rng = Rng(seed);
                    for _ in 0..120 {
                        model_step(&mut rng, &operator, &ca, &mut key, &mut tally).await;
                    }
                    // The service's view of every state equals the model's.
                    let served = get(&operator, &key.key_id).await;
                    let served: BTreeMap<u32, i32> = served.versions.iter().map(|v| (v.version, v.state)).collect();
                    let modelled: BTreeMap<u32, i32> = key.states.iter().map(|(v, s)| (*v, *s as i32)).collect();
                    assert_eq!(served, modelled, "{}", key.key_id);
                }
            }
            println!("lifecycle model: {tally:?}");
            assert_eq!(tally.illegal_transitions_accepted, 0);
            assert_eq!(tally.uses_by_wrong_state, 0);
            assert!(tally.disagreements.is_empty(), "{:#?}", tally.disagreements);
            // The sequences reach both sides of every rule.
            assert!(tally.transitions_accepted > 20 && tally.transitions_refused > 20, "{tally:?}");
            assert!(tally.uses_allowed > 20 && tally.uses_refused > 20, "{tally:?}");
        });
    }
);

token_test!(
    fn the_scheduler_rotates_before_the_cryptoperiod_ends_and_an_ended_period_stops_signing(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let ca = service.client("ca-issuing").await;
            // 2 h: the scheduler rotates an hour ahead (rotate_ahead_secs).
            create(&operator, "tls", "EC_SIGN_P256_SHA256", Some(2 * 3600)).await;
            sign(&ca, "keys/tls").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(get(&operator, "tls").await.primary_version, 1, "rotated too early");

            service.clock.advance(HOUR_MS + 60_000);
            eventually("the scheduler rotates keys/tls", || async {
                get(&operator, "tls").await.primary_version == 2
            })
            .await;
            // v1 still signs until its period ends, then never again.
            sign(&ca, "keys/tls/versions/1").await.unwrap();
            // Past v1's end (start + 2 h), short of v2's rotation point
            // (its activation + 1 h), so the scheduler stays out of the way.
            service.clock.advance(HOUR_MS - 30_000);
            let ended = sign(&ca, "keys/tls/versions/1").await.unwrap_err();
            assert_eq!(reason(&ended), "CRYPTOPERIOD_ENDED");
            verify(&ca, "keys/tls/versions/1").await.unwrap();
            sign(&ca, "keys/tls").await.unwrap();

            // One request id rotates once, however often it is retried.
            let mut keys = KeyServiceClient::new(operator.clone());
            let request = RotateKeyRequest { name: "keys/tls".into(), request_id: "change-4711".into() };
            let first = keys.rotate_key(request.clone()).await.unwrap().into_inner();
            let again = keys.rotate_key(request).await.unwrap().into_inner();
            assert_eq!(first.primary_version, 3);
            assert_eq!(again.versions.len(), 3, "a retried request id rotated again");
            let bad = keys
                .rotate_key(RotateKeyRequest { name: "keys/tls".into(), request_id: "no spaces".into() })
                .await
                .unwrap_err();
            assert_eq!(reason(&bad), "BAD_REQUEST_ID");
            // The scheduler's request ids are its own: a client cannot make a
            // scheduled rotation look done.
            let reserved = keys
                .rotate_key(RotateKeyRequest { name: "keys/tls".into(), request_id: "schedule:v3".into() })
                .await
                .unwrap_err();
            assert_eq!(reason(&reserved), "BAD_REQUEST_ID");
        });
    }
);

token_test!(
    fn marking_the_primary_compromised_rotates_and_records_a_revocation_notice(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let ca = service.client("ca-issuing").await;
            create(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            let unexplained = set_state(&operator, "keys/issuing/versions/1", KeyVersionState::Compromised, " ").await.unwrap_err();
            assert_eq!(reason(&unexplained), "REASON_REQUIRED");
            let version = set_state(&operator, "keys/issuing/versions/1", KeyVersionState::Compromised, "HSM backup tape lost").await.unwrap();
            assert_eq!(version.state, KeyVersionState::Compromised as i32);
            let key = get(&operator, "issuing").await;
            assert_eq!(key.primary_version, 2);
            for refused in [sign(&ca, "keys/issuing/versions/1").await, verify(&ca, "keys/issuing/versions/1").await] {
                assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
            }
            sign(&ca, "keys/issuing").await.unwrap();
            let back = set_state(&operator, "keys/issuing/versions/1", KeyVersionState::Active, "").await.unwrap_err();
            assert_eq!(reason(&back), "ILLEGAL_TRANSITION");

            let notice = service
                .state()
                .audit
                .records(1)
                .map(|r| String::from_utf8(r.unwrap().entry).unwrap())
                .find(|e| e.contains("revocation_notice"))
                .expect("a revocation notice in the audit log");
            assert!(notice.contains("HSM backup tape lost") && notice.contains("rotating to version 2"), "{notice}");
            let spki = hex::decode(&service.state().registry.get("issuing").unwrap().versions[0].public_key_der_hex).unwrap();
            let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(spki));
            assert!(notice.contains(&fingerprint), "{notice}");
        });
    }
);

async fn hsm_has(service: &TestService, label: &str) -> bool {
    let label = hsm_shim::KeyLabel::new(label).unwrap();
    match service.state().hsm.run(move |s| s.public_key(&label)).await {
        Ok(_) => true,
        Err(e) if e.kind() == hsm_shim::ErrorKind::NotFound => false,
        Err(e) => panic!("{e}"),
    }
}

token_test!(
    fn destruction_needs_a_quorum_waits_out_its_cancel_window_and_a_legal_hold_blocks_it(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let ca = service.client("ca-issuing").await;
            create(&operator, "old", "EC_SIGN_P256_SHA256", None).await;
            let mut keys = KeyServiceClient::new(operator.clone());
            keys.rotate_key(RotateKeyRequest { name: "keys/old".into(), ..Default::default() }).await.unwrap();
            let destroy = |name: &str| operation_spec::Spec::DestroyVersion(VersionRef { name: name.into() });

            // Only retired versions, never the primary, and only with approval.
            let active = request_operation(&operator, destroy("keys/old/versions/1")).await.unwrap_err();
            assert_eq!(reason(&active), "ILLEGAL_TRANSITION");
            let primary = request_operation(&operator, destroy("keys/old/versions/2")).await.unwrap_err();
            assert_eq!(reason(&primary), "ILLEGAL_TRANSITION");
            set_state(&operator, "keys/old/versions/1", KeyVersionState::Deactivated, "").await.unwrap();
            let operation = request_operation(&operator, destroy("keys/old/versions/1")).await.unwrap();
            assert_eq!(operation.required, 2);
            assert!(operation.rendering.contains("DESTROY keys/old/versions/1"), "{}", operation.rendering);
            service.approve("alice", &operation).await.unwrap();
            let done = service.approve("bob", &operation).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);

            // Scheduled: unusable at once, destroyed only after 24 h.
            let version = get(&operator, "old").await.versions[0].clone();
            let at = version.destroy_time.unwrap();
            let expected = (service.clock.now_ms() + 24 * HOUR_MS) / 1000;
            assert!((at.seconds - expected).abs() <= 5, "destroy time {at:?}");
            assert_eq!(reason(&verify(&ca, "keys/old/versions/1").await.unwrap_err()), "DESTROY_SCHEDULED");
            // Cancelled within the window, it is usable again.
            keys.cancel_destroy(VersionRef { name: "keys/old/versions/1".into() }).await.unwrap();
            verify(&ca, "keys/old/versions/1").await.unwrap();

            let operation = request_operation(&operator, destroy("keys/old/versions/1")).await.unwrap();
            service.approve("bob", &operation).await.unwrap();
            service.approve("carol", &operation).await.unwrap();
            service.clock.advance(23 * HOUR_MS);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(hsm_has(&service, "key/old/v1").await, "destroyed inside the cancel window");
            service.clock.advance(2 * HOUR_MS);
            eventually("the scheduler destroys keys/old/versions/1", || async {
                get(&operator, "old").await.versions[0].state == KeyVersionState::Destroyed as i32
            })
            .await;
            assert!(!hsm_has(&service, "key/old/v1").await, "the HSM object survived its destruction");
            assert!(hsm_has(&service, "key/old/v2").await);
            let report = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
            assert!(report.findings.is_empty(), "{:?}", report.findings);
            let restore = set_state(&operator, "keys/old/versions/1", KeyVersionState::Active, "").await.unwrap_err();
            assert_eq!(reason(&restore), "ILLEGAL_TRANSITION");

            // A legal hold cancels a scheduled destruction and blocks new ones
            // until officers release it.
            keys.rotate_key(RotateKeyRequest { name: "keys/old".into(), ..Default::default() }).await.unwrap();
            set_state(&operator, "keys/old/versions/2", KeyVersionState::Deactivated, "").await.unwrap();
            let operation = request_operation(&operator, destroy("keys/old/versions/2")).await.unwrap();
            service.approve("alice", &operation).await.unwrap();
            service.approve("carol", &operation).await.unwrap();
            keys.set_legal_hold(SetLegalHoldRequest { name: "keys/old/versions/2".into(), reason: "case 2026-117".into() }).await.unwrap();
            let held = get(&operator, "old").await.versions[1].clone();
            assert!(held.legal_hold && held.destroy_time.is_none(), "{held:?}");
            service.clock.advance(48 * HOUR_MS);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(hsm_has(&service, "key/old/v2").await, "a held version was destroyed");
            let refused = request_operation(&operator, destroy("keys/old/versions/2")).await.unwrap_err();
            assert_eq!(reason(&refused), "LEGAL_HOLD");
            let release = request_operation(
                &operator,
                operation_spec::Spec::ReleaseLegalHold(VersionRef { name: "keys/old/versions/2".into() }),
            )
            .await
            .unwrap();
            service.approve("alice", &release).await.unwrap();
            let released = service.approve("bob", &release).await.unwrap();
            assert_eq!(released.state, OperationState::Succeeded as i32, "{}", released.error);
            assert!(!get(&operator, "old").await.versions[1].legal_hold);
            request_operation(&operator, destroy("keys/old/versions/2")).await.unwrap();
        });
    }
);

token_test!(
    fn a_key_retires_as_a_whole_its_last_version_is_destroyed_and_custodyd_never_brings_it_back(token) {
        // End of life for a root or KEK: no new version, the last one
        // destroyed. Attacks: retiring the primary while another version
        // still signs (rotating is what that means), and custodyd itself
        // making a retired key live again when its primary is found
        // compromised (on the request, or on the scheduler's tick).
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let ca = service.client("ca-issuing").await;
            create(&operator, "end", "EC_SIGN_P256_SHA256", None).await;
            let mut keys = KeyServiceClient::new(operator.clone());
            keys.rotate_key(RotateKeyRequest { name: "keys/end".into(), ..Default::default() }).await.unwrap();

            let early = set_state(&operator, "keys/end/versions/2", KeyVersionState::Deactivated, "").await.unwrap_err();
            assert_eq!(reason(&early), "PRIMARY_VERSION");
            sign(&ca, "keys/end/versions/1").await.unwrap();

            set_state(&operator, "keys/end/versions/1", KeyVersionState::Deactivated, "").await.unwrap();
            set_state(&operator, "keys/end/versions/2", KeyVersionState::Deactivated, "end of life").await.unwrap();
            assert_eq!(reason(&sign(&ca, "keys/end").await.unwrap_err()), "VERSION_NOT_ACTIVE");

            set_state(&operator, "keys/end/versions/2", KeyVersionState::Compromised, "retired tape found opened").await.unwrap();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let key = get(&operator, "end").await;
            assert_eq!(key.versions.len(), 2, "a new version brought the retired key back: {key:?}");
            assert_eq!(key.primary_version, 2);
            let notice = service
                .state()
                .audit
                .records(1)
                .map(|r| String::from_utf8(r.unwrap().entry).unwrap())
                .find(|e| e.contains("revocation_notice") && e.contains("keys/end/versions/2"))
                .expect("a revocation notice for the retired primary");
            assert!(notice.contains("the key is retired"), "{notice}");

            let destroy = operation_spec::Spec::DestroyVersion(VersionRef { name: "keys/end/versions/2".into() });
            let operation = request_operation(&operator, destroy).await.unwrap();
            service.approve("alice", &operation).await.unwrap();
            let done = service.approve("bob", &operation).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
            service.clock.advance(25 * HOUR_MS);
            eventually("the scheduler destroys keys/end/versions/2", || async {
                get(&operator, "end").await.versions[1].state == KeyVersionState::Destroyed as i32
            })
            .await;
            assert!(!hsm_has(&service, "key/end/v2").await, "the retired primary's object survived");
            let report = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
            assert!(report.findings.is_empty(), "{:?}", report.findings);
            assert_eq!(get(&operator, "end").await.versions.len(), 2);
        });
    }
);

token_test!(
    fn a_key_whose_rotation_needs_officers_is_not_rotated_by_the_scheduler(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create(&operator, "root", "EC_SIGN_P256_SHA256", Some(2 * 3600)).await;
            service.gate("root", OperationKind::Rotate).await;
            service.clock.advance(3 * HOUR_MS);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let key = get(&operator, "root").await;
            assert_eq!(key.versions.len(), 1, "the scheduler rotated a quorum-gated key");
            let ca = service.client("ca-issuing").await;
            assert_eq!(reason(&sign(&ca, "keys/root").await.unwrap_err()), "CRYPTOPERIOD_ENDED");

            // Compromised, the gated primary is not rotated by custodyd
            // either; out of use, its destruction is the officers' to
            // approve, primary or not.
            set_state(&operator, "keys/root/versions/1", KeyVersionState::Compromised, "officer laptop stolen").await.unwrap();
            assert_eq!(get(&operator, "root").await.versions.len(), 1);
            let destroy = operation_spec::Spec::DestroyVersion(VersionRef { name: "keys/root/versions/1".into() });
            let pending = request_operation(&operator, destroy).await.unwrap();
            assert_eq!(pending.state, OperationState::Pending as i32);

            // Updates of a key under an UPDATE_KEY policy need officers too,
            // and state changes are checked when requested, not when run.
            service.gate("root", OperationKind::UpdateKey).await;
            let update = UpdateKeyRequest { name: "keys/root".into(), min_version: Some(1), ..Default::default() };
            let direct = KeyServiceClient::new(operator.clone()).update_key(update.clone()).await.unwrap_err();
            assert_eq!(reason(&direct), "QUORUM_REQUIRED");
            let operation = request_operation(&operator, operation_spec::Spec::UpdateKey(update)).await.unwrap();
            assert!(operation.rendering.contains("UPDATE keys/root"), "{}", operation.rendering);
            service.approve("alice", &operation).await.unwrap();
            let done = service.approve("carol", &operation).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
            assert_eq!(get(&operator, "root").await.min_version, 1);
            service.gate("root", OperationKind::SetState).await;
            let back = operation_spec::Spec::SetState(SetStateSpec {
                name: "keys/root/versions/1".into(),
                state: KeyVersionState::Active as i32,
                reason: String::new(),
            });
            assert_eq!(reason(&request_operation(&operator, back).await.unwrap_err()), "ILLEGAL_TRANSITION");
        });
    }
);

token_test!(
    fn drift_reports_objects_removed_added_or_replaced_behind_custodyds_back(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.lifecycle.drift_check_interval_secs = 1;
            })
            .await;
            let operator = service.client("operator").await;
            create(&operator, "gone", "EC_SIGN_P256_SHA256", None).await;
            create(&operator, "swapped", "AES_256_GCM", None).await;
            create(&operator, "fine", "EC_SIGN_P384_SHA384", None).await;
            let mut keys = KeyServiceClient::new(operator.clone());
            let clean = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
            assert!(clean.findings.is_empty(), "{:?}", clean.findings);
            assert_eq!(clean.versions_checked, 3);

            let tool = |args: &[&str]| {
                let output = token.pkcs11_tool().args(["--login", "--pin", token.user_pin()]).args(args).output().unwrap();
                assert!(output.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&output.stderr));
            };
            tool(&["--delete-object", "--type", "privkey", "--label", "key/gone/v1"]);
            tool(&["--keygen", "--key-type", "AES:32", "--label", "rogue", "--id", "726f677565"]);
            tool(&["--delete-object", "--type", "secrkey", "--label", "key/swapped/v1"]);
            tool(&["--keygen", "--key-type", "AES:32", "--label", "key/swapped/v1", "--id", &hex::encode("key/swapped/v1")]);

            let report = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
            let found: BTreeSet<(i32, String, String)> = report
                .findings
                .iter()
                .map(|f| (f.kind, f.label.clone(), f.object_class.clone()))
                .collect();
            let expected = BTreeSet::from([
                (DriftKind::Missing as i32, "key/gone/v1".to_string(), "private".to_string()),
                (DriftKind::Extra as i32, "rogue".into(), "secret".into()),
                (DriftKind::AttributeMismatch as i32, "key/swapped/v1".into(), "secret".into()),
            ]);
            assert_eq!(found, expected, "{:#?}", report.findings);
            let swapped = report.findings.iter().find(|f| f.label == "key/swapped/v1").unwrap();
            assert!(swapped.detail.contains("key check value"), "{}", swapped.detail);
            assert_eq!(swapped.version, "keys/swapped/versions/1");

            // The periodic check finds it too, and records it once.
            let periodic = || {
                service
                    .state()
                    .audit
                    .records(1)
                    .map(|r| String::from_utf8(r.unwrap().entry).unwrap())
                    .filter(|e| e.contains("\"method\":\"DriftCheck\"") && e.contains("\"outcome\":\"DRIFT\""))
                    .collect::<Vec<_>>()
            };
            // (Checks that ran while pkcs11-tool was halfway through record
            // what they saw; once the drift stands still, nothing new is.)
            let complete = |e: &String| {
                e.contains("missing key/gone/v1 private")
                    && e.contains("extra rogue secret")
                    && e.contains("attribute_mismatch key/swapped/v1 secret")
            };
            eventually("the scheduler's drift check records the drift", || async { periodic().iter().any(complete) }).await;
            let recorded = periodic().len();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert_eq!(periodic().len(), recorded, "a standing drift is recorded again");

            // The drift check is audited like any request.
            let audited = service
                .state()
                .audit
                .records(1)
                .filter(|r| String::from_utf8_lossy(&r.as_ref().unwrap().entry).contains("\"method\":\"CheckDrift\""))
                .count();
            assert_eq!(audited, 2);
            let signer = service.client("ca-issuing").await;
            let denied = KeyServiceClient::new(signer).check_drift(CheckDriftRequest {}).await.unwrap_err();
            assert_eq!(reason(&denied), "ROLE_REQUIRED");
        });
    }
);
