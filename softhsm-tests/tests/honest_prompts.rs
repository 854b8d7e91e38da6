//! R1, prompts from structure and digests recomputed (threat model, request
//! surface), attacked through the real gRPC server with real mTLS on
//! SoftHSM2.
//!
//! The attack of issue 13: an operator puts carriage returns and escape
//! sequences in a `SET_STATE` reason so that the officers' terminals show
//! "SET STATE of keys/test-key/versions/1 to SUSPENDED" while the operation
//! compromises `root-ca`; or a custodyd that lies shows one operation and
//! hands out the digest of another. Free text with control, bidi or
//! zero-width characters, or over its cap, is refused at the API; custodyctl
//! renders what it asks an officer to sign from the operation's structure,
//! recomputes the digest from it, and refuses to sign when custodyd's digest
//! differs.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use custody_core::dual_control::approval_message;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::dual_control::operation::Terms;
use custody_core::dual_control::quorum::Quorum;
use custody_core::identity::Role;
use custody_daemon::review::{Reviewed, spec_of, verify_operation};
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    AbortCeremonyRequest, CeremonyState, Digest, GetCeremonyRequest, GetOperationRequest, KeyRef,
    KeyVersionState, ListOperationsRequest, OfficerSpec, Operation, OperationKind, OperationSpec,
    RotateKeyRequest, SetKeyVersionStateRequest, SetLegalHoldRequest, SetStateSpec, SignSpec,
    SignatureEncoding, UpdateKeyRequest, VersionRef, VoteRequest, digest, operation_spec,
};
use hsm_shim::SecretString;
use softhsm_tests::ceremony::{Officers, root_script};
use softhsm_tests::service::{TestService, create_key, reason, request_operation, runtime};
use softhsm_tests::token_test;
use tonic::Code;
use tonic::transport::Channel;

/// What the operator of issue 13 typed: return to the start of the line,
/// erase it, and print a harmless-looking operation over it.
const FORGED: &str = "\r\x1b[2K  SET STATE of keys/test-key/versions/1 to SUSPENDED\x1b[8m";

/// One character of each kind that must never reach an officer's screen:
/// C0 (escape, carriage return, line feed, tab, NUL), DEL, C1 (NEL, CSI),
/// bidi overrides and isolates, bidi marks, zero-width space, joiner and
/// non-joiner, word joiner, byte order mark, line and paragraph separators.
const HIDDEN: [char; 20] = [
    '\x1b', '\r', '\n', '\t', '\0', '\x7f', '\u{85}', '\u{9b}', '\u{202e}', '\u{202a}', '\u{2066}',
    '\u{2069}', '\u{200f}', '\u{200b}', '\u{200c}', '\u{200d}', '\u{2060}', '\u{feff}', '\u{2028}',
    '\u{2029}',
];

token_test!(
    fn free_text_with_hidden_characters_or_over_its_cap_is_refused_at_the_api(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "test-key", "EC_SIGN_P256_SHA256", None).await;
            create_key(&operator, "root-ca", "EC_SIGN_P256_SHA256", None).await;
            service.gate("root-ca", OperationKind::SetState).await;
            let officer = service.client_as("alice", &[Role::Officer]).await;
            let operations_before = OperationServiceClient::new(officer.clone())
                .list_operations(ListOperationsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .operations
                .len();
            let mut keys = KeyServiceClient::new(operator.clone());
            let set_state_operation = |reason: String| {
                operation_spec::Spec::SetState(SetStateSpec {
                    name: "keys/root-ca/versions/1".into(),
                    state: KeyVersionState::Compromised as i32,
                    reason,
                })
            };

            // The forged prompt itself, as a SET_STATE operation's reason.
            let status = request_operation(&operator, set_state_operation(FORGED.into()))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert_eq!(reason(&status), "BAD_REASON");
            let mut refused = 1;

            // One hidden character of each kind, in each free-text field.
            for hidden in HIDDEN {
                let text = format!("key material seen in a{hidden} ticket");
                let what = format!("U+{:04X}", hidden as u32);
                let status = request_operation(&operator, set_state_operation(text.clone()))
                    .await
                    .unwrap_err();
                assert_eq!(reason(&status), "BAD_REASON", "RequestOperation reason with {what}");
                let status = keys
                    .set_key_version_state(SetKeyVersionStateRequest {
                        name: "keys/test-key/versions/1".into(),
                        state: KeyVersionState::Suspended as i32,
                        reason: text.clone(),
                    })
                    .await
                    .unwrap_err();
                assert_eq!(reason(&status), "BAD_REASON", "SetKeyVersionState reason with {what}");
                let status = keys
                    .set_legal_hold(SetLegalHoldRequest {
                        name: "keys/test-key/versions/1".into(),
                        reason: text.clone(),
                    })
                    .await
                    .unwrap_err();
                assert_eq!(reason(&status), "BAD_REASON", "SetLegalHold reason with {what}");
                refused += 3;
            }

            // The cap counts characters: 256 accepted, 257 refused.
            let at_cap = "é".repeat(256);
            let over_cap = "é".repeat(257);
            let status = request_operation(&operator, set_state_operation(over_cap.clone()))
                .await
                .unwrap_err();
            assert_eq!(reason(&status), "BAD_REASON");
            let status = keys
                .set_legal_hold(SetLegalHoldRequest {
                    name: "keys/test-key/versions/1".into(),
                    reason: over_cap.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&status), "BAD_REASON");
            refused += 2;
            let pending = request_operation(&operator, set_state_operation(at_cap.clone()))
                .await
                .unwrap();
            let suspended = keys
                .set_key_version_state(SetKeyVersionStateRequest {
                    name: "keys/test-key/versions/1".into(),
                    state: KeyVersionState::Suspended as i32,
                    reason: at_cap.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(suspended.state, KeyVersionState::Suspended as i32);
            keys.set_legal_hold(SetLegalHoldRequest {
                name: "keys/test-key/versions/1".into(),
                reason: format!("case 2026-117, {}", "é".repeat(200)),
            })
            .await
            .unwrap();

            // Nothing refused was stored: only the gate and the operation at
            // the cap are there.
            let operations = OperationServiceClient::new(officer.clone())
                .list_operations(ListOperationsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .operations;
            assert_eq!(operations.len(), operations_before + 1);
            assert!(operations.iter().any(|o| o.name == pending.name));

            // Ceremonies: an abort reason of 10,000 characters, or with an
            // escape sequence, is refused and the ceremony goes on; a script
            // whose description hides a bidi override is refused.
            let channels = [
                ("alice".to_string(), service.client("alice").await),
                ("bob".to_string(), service.client("bob").await),
                ("carol".to_string(), service.client("carol").await),
            ]
            .into_iter()
            .collect();
            let officers = Officers::new(&service.officers, channels);
            let script = root_script("root-ceremony", "root-two", false);
            let name = officers.start("alice", &script, "").await.unwrap().name;
            let mut ceremonies = CeremonyServiceClient::new(service.client("carol").await);
            for why in ["x".repeat(10_000), FORGED.to_string(), "ok\u{202e}".into()] {
                let status = ceremonies
                    .abort_ceremony(AbortCeremonyRequest { name: name.clone(), reason: why })
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert_eq!(reason(&status), "BAD_REASON");
                refused += 1;
            }
            let ceremony = ceremonies
                .get_ceremony(GetCeremonyRequest { name: name.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(ceremony.state, CeremonyState::AwaitingOfficers as i32);
            let hidden_description = root_script("root-bidi", "root-three", false).replace(
                "description = \"test root key\"",
                "description = \"test root key \u{202e}yek toor tset\"",
            );
            let status = officers.start("alice", &hidden_description, "").await.unwrap_err();
            assert_eq!(reason(&status), "BAD_SCRIPT", "{status:?}");
            assert!(status.message().contains("description"), "{}", status.message());
            refused += 1;
            let aborted = ceremonies
                .abort_ceremony(AbortCeremonyRequest { name, reason: "é".repeat(256) })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(aborted.state, CeremonyState::Aborted as i32);
            assert_eq!(refused, 67);
            eprintln!("{refused} free-text fields with hidden characters or over the cap refused");
        });
    }
);

/// Fetches `name` as officer alice.
async fn fetch(officer: &Channel, name: &str) -> Operation {
    OperationServiceClient::new(officer.clone())
        .get_operation(GetOperationRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// What custodyctl approve would say to `shown`: the operation it would let
/// an officer sign, or why it refuses.
fn reviewed(shown: &Operation) -> Result<Reviewed, String> {
    verify_operation(shown)
}

token_test!(
    fn custodyctl_signs_only_a_digest_it_recomputes_from_the_operation_it_shows(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let officer = service.client_as("alice", &[Role::Officer]).await;
            for key in ["test-key", "root-ca", "old-key"] {
                create_key(&operator, key, "EC_SIGN_P256_SHA256", None).await;
            }
            service.gate("test-key", OperationKind::SetState).await;
            for kind in [OperationKind::SetState, OperationKind::Sign, OperationKind::Rotate, OperationKind::UpdateKey] {
                service.gate("root-ca", kind).await;
            }
            let mut keys = KeyServiceClient::new(operator.clone());
            keys.rotate_key(RotateKeyRequest { name: "keys/old-key".into(), request_id: String::new() })
                .await
                .unwrap();
            keys.set_key_version_state(SetKeyVersionStateRequest {
                name: "keys/old-key/versions/1".into(),
                state: KeyVersionState::Deactivated as i32,
                reason: String::new(),
            })
            .await
            .unwrap();
            keys.set_legal_hold(SetLegalHoldRequest {
                name: "keys/test-key/versions/1".into(),
                reason: "case 2026-117".into(),
            })
            .await
            .unwrap();

            // Two real operations: the one the officers are shown, and the
            // one a lying custodyd would have them sign.
            let benign = request_operation(
                &operator,
                operation_spec::Spec::SetState(SetStateSpec {
                    name: "keys/test-key/versions/1".into(),
                    state: KeyVersionState::Suspended as i32,
                    reason: "scheduled maintenance".into(),
                }),
            )
            .await
            .unwrap();
            let evil = request_operation(
                &operator,
                operation_spec::Spec::SetState(SetStateSpec {
                    name: "keys/root-ca/versions/1".into(),
                    state: KeyVersionState::Compromised as i32,
                    reason: "leaked".into(),
                }),
            )
            .await
            .unwrap();
            // And one of every other kind that needs no ceremony first.
            let (dave, _) = OfficerKey::generate("dave", &SecretString::from("dave's passphrase, long enough")).unwrap();
            let others = [
                (&service.client("ca-issuing").await, operation_spec::Spec::Sign(SignSpec {
                    name: "keys/root-ca".into(),
                    digest: Some(Digest { digest: Some(digest::Digest::Sha256(vec![7; 32])) }),
                    encoding: SignatureEncoding::Raw as i32,
                })),
                (&operator, operation_spec::Spec::Rotate(KeyRef { name: "keys/root-ca".into() })),
                (&operator, operation_spec::Spec::UpdateKey(UpdateKeyRequest {
                    name: "keys/root-ca".into(),
                    cryptoperiod: Some(prost_types::Duration { seconds: 90 * 86_400, nanos: 0 }),
                    min_version: Some(1),
                })),
                (&operator, operation_spec::Spec::AddOfficer(OfficerSpec {
                    officer_id: "dave".into(),
                    principal: "dave".into(),
                    public_key: dave.public_key().to_vec(),
                })),
                (&operator, operation_spec::Spec::RemoveOfficer(OfficerSpec {
                    officer_id: "carol".into(),
                    ..Default::default()
                })),
                (&operator, operation_spec::Spec::ReleaseLegalHold(VersionRef { name: "keys/test-key/versions/1".into() })),
                (&operator, operation_spec::Spec::DestroyVersion(VersionRef { name: "keys/old-key/versions/1".into() })),
            ];
            for (channel, spec) in others {
                request_operation(channel, spec).await.unwrap();
            }

            // Every real operation, as custodyd shows it, passes review: the
            // digest custodyctl recomputes is the daemon's.
            let all = OperationServiceClient::new(officer.clone())
                .list_operations(ListOperationsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .operations;
            let mut kinds = std::collections::BTreeSet::new();
            for operation in &all {
                let shown = fetch(&officer, &operation.name).await;
                let review = reviewed(&shown).unwrap_or_else(|e| panic!("{}: {e}", shown.name));
                assert_eq!(review.digest.to_vec(), shown.digest);
                kinds.insert(format!("{:?}", shown.spec.as_ref().unwrap().spec.as_ref().map(std::mem::discriminant)));
            }
            assert_eq!(all.len(), 5 + 2 + 7, "5 gates, the two SET_STATEs and 7 others");
            assert_eq!(kinds.len(), 9, "every kind but CREATE_BACKUP");

            let benign = fetch(&officer, &benign.name).await;
            let evil = fetch(&officer, &evil.name).await;
            let good = reviewed(&benign).unwrap();
            assert!(
                good.rendering.contains("SET STATE of keys/test-key/versions/1 to SUSPENDED, because: scheduled maintenance"),
                "{}",
                good.rendering
            );

            // A lying custodyd: each change to what an officer is shown, or
            // to the digest handed out with it, and custodyctl refuses.
            let mut forgeries: Vec<(&str, Operation)> = Vec::new();
            forgeries.push(("the benign operation's spec and prose over the evil one's digest", Operation {
                spec: benign.spec.clone(),
                rendering: benign.rendering.clone(),
                ..evil.clone()
            }));
            forgeries.push(("the benign operation with the evil one's digest", Operation {
                digest: evil.digest.clone(),
                ..benign.clone()
            }));
            forgeries.push(("the benign operation under the evil one's name", Operation {
                name: evil.name.clone(),
                ..benign.clone()
            }));
            let mut altered = benign.clone();
            altered.requester = "alice".into();
            forgeries.push(("another requester", altered));
            let mut altered = benign.clone();
            altered.create_time.as_mut().unwrap().nanos += 1_000_000;
            forgeries.push(("another request time", altered));
            let mut altered = benign.clone();
            altered.expire_time.as_mut().unwrap().seconds += 3600;
            forgeries.push(("a later expiry", altered));
            let mut altered = benign.clone();
            altered.eligible_officers.retain(|o| o != "carol");
            forgeries.push(("fewer eligible officers", altered));
            let mut altered = benign.clone();
            altered.required = 3;
            forgeries.push(("more approvals needed", altered));
            let mut altered = benign.clone();
            altered.nonce = "00".repeat(16);
            forgeries.push(("another nonce", altered));
            let set_state = |operation: &Operation, change: &dyn Fn(&mut SetStateSpec)| {
                let mut operation = operation.clone();
                if let Some(OperationSpec { spec: Some(operation_spec::Spec::SetState(spec)) }) = operation.spec.as_mut() {
                    change(spec);
                }
                operation
            };
            forgeries.push(("another reason", set_state(&benign, &|s| s.reason = "routine".into())));
            forgeries.push(("another state", set_state(&evil, &|s| s.state = KeyVersionState::Suspended as i32)));
            forgeries.push(("another key", set_state(&evil, &|s| s.name = "keys/test-key/versions/1".into())));
            for (what, forged) in &forgeries {
                let refusal = reviewed(forged).expect_err(what);
                eprintln!("{what}: refused: {refusal}");
                assert!(refusal.contains("digest"), "{what}: {refusal}");
            }

            // A custodyd that stored (or made up) a reason with the escape
            // sequences of issue 13 and hands out the matching digest: the
            // digest checks out, custodyctl still refuses to sign, and the
            // rendering shows the characters escaped, never raw.
            let mut hidden = set_state(&benign, &|s| s.reason = FORGED.into());
            let spec = spec_of(hidden.spec.as_ref().unwrap()).unwrap();
            let quorum = Quorum {
                members: hidden.eligible_officers.iter().cloned().collect(),
                required: hidden.required,
            };
            let ms = |t: &prost_types::Timestamp| t.seconds * 1000 + i64::from(t.nanos / 1_000_000);
            let terms = Terms {
                id: hidden.name.trim_start_matches("operations/"),
                spec: &spec,
                requester: &hidden.requester,
                created_ms: ms(hidden.create_time.as_ref().unwrap()),
                expires_ms: ms(hidden.expire_time.as_ref().unwrap()),
                nonce: &hidden.nonce,
                quorum: &quorum,
            };
            hidden.digest = terms.digest().to_vec();
            let refusal = reviewed(&hidden).unwrap_err();
            assert!(refusal.contains("U+000D"), "{refusal}");
            let rendering = terms.rendering();
            assert!(!rendering.contains(['\x1b', '\r']), "{rendering:?}");
            assert!(rendering.contains("\\u{1b}[2K"), "{rendering}");

            // Prose from custodyd is not what an officer reads: lies in the
            // rendering change nothing that is shown.
            let lying_prose = Operation {
                rendering: "operation operations/x\n  ROTATE keys/test-key\n".into(),
                ..evil.clone()
            };
            let honest = reviewed(&lying_prose).unwrap();
            assert!(honest.rendering.contains("SET STATE of keys/root-ca/versions/1 to COMPROMISED, because: leaked"), "{}", honest.rendering);
            assert!(!honest.rendering.contains("ROTATE keys/test-key"));

            // What custodyctl signs is what custodyd checks: alice's approval
            // over the recomputed digest counts.
            let channel = service.client_as("alice", &[Role::Officer]).await;
            let approved = OperationServiceClient::new(channel)
                .approve_operation(VoteRequest {
                    name: good.name.clone(),
                    officer_id: "alice".into(),
                    signature: service.officer("alice").sign(&approval_message(&good.digest)).to_vec(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(approved.approvals.len(), 1);
            eprintln!("{} forged operations refused, {} real ones reviewed", forgeries.len(), all.len());
        });
    }
);
