//! I3, protections travel with the key (issue 12, scenario 3).
//!
//! At the source, `issuer` needs 2 of 3 officers to sign, rotate or change
//! a version's state; it has a cryptoperiod, a minimum version, a legal hold
//! and versions in three states. It is backed up, the source is lost, and an
//! honest restore ceremony brings it back on a fresh daemon. Then the signer
//! and the operator try, each alone, what needed officers at the source.
//!
//! Safe: GetKey of the restored key equals the source's in every protection,
//! field by field, with the kinds the source's administrative quorum
//! governed written in as the key's own (so that a restoring daemon with a
//! weaker administrative quorum does not govern them), and the quorum-gated
//! calls are refused directly after the restore. (The fix carries the protections in the signed manifest; a key
//! whose protections cannot be reproduced would come back SUSPENDED, which
//! shows here as a difference: this key's can all be reproduced.)

use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{
    Algorithm, CreateKeyRequest, Key, KeyPurpose, KeyVersionState, OperationKind,
    SetLegalHoldRequest, UpdateKeyRequest,
};
use softhsm_tests::service::{TestService, runtime};
use softhsm_tests::token_test;

use crate::common::{
    PAYLOAD, back_up_a_source, back_up_a_source_configured, get_key, requested_and_approved,
    restored_whole, rotate, set_state, sign, unless_quorum_required, with_v1_deactivated,
};
use softhsm_tests::ceremony::kek_script;

/// Everything about a key that protects it.
#[derive(Debug, Clone, PartialEq)]
struct Protections {
    algorithm: Algorithm,
    allowed_signers: Vec<String>,
    primary_version: u32,
    /// (operation, officers, required), sorted.
    policies: Vec<(String, Vec<String>, u32)>,
    cryptoperiod_secs: Option<i64>,
    min_version: u32,
    backup_exportable: bool,
    /// (version, state, legal hold).
    versions: Vec<(u32, KeyVersionState, bool)>,
}

fn protections(key: &Key) -> Protections {
    let mut policies: Vec<_> = key
        .policies
        .iter()
        .map(|p| {
            let mut officers = p.officers.clone();
            officers.sort();
            (p.operation.clone(), officers, p.required)
        })
        .collect();
    policies.sort();
    Protections {
        algorithm: key.algorithm(),
        allowed_signers: key.allowed_signers.clone(),
        primary_version: key.primary_version,
        policies,
        cryptoperiod_secs: key.cryptoperiod.as_ref().map(|d| d.seconds),
        min_version: key.min_version,
        backup_exportable: key.backup_exportable,
        versions: key
            .versions
            .iter()
            .map(|v| (v.version, v.state(), v.legal_hold))
            .collect(),
    }
}

/// `issuer` at the source: three versions (deactivated, suspended under a
/// legal hold, active), a cryptoperiod, minimum version 2, and SIGN, ROTATE
/// and SET_STATE each under 2 of alice, bob and carol.
async fn protected_issuer(source: &TestService) {
    let operator = source.client("operator").await;
    let mut keys = KeyServiceClient::new(operator.clone());
    keys.create_key(CreateKeyRequest {
        key_id: "issuer".into(),
        algorithm: Algorithm::EcSignP256Sha256 as i32,
        purpose: KeyPurpose::AsymmetricSign as i32,
        allowed_signers: vec!["ca-issuing".into()],
        cryptoperiod: Some(prost_types::Duration {
            seconds: 90 * 86_400,
            nanos: 0,
        }),
        backup_exportable: true,
    })
    .await
    .unwrap();
    for _ in 0..2 {
        rotate(&operator, "issuer").await.unwrap();
    }
    let v = |n: u32| format!("keys/issuer/versions/{n}");
    set_state(&operator, &v(1), KeyVersionState::Deactivated, "")
        .await
        .unwrap();
    set_state(&operator, &v(2), KeyVersionState::Suspended, "")
        .await
        .unwrap();
    keys.update_key(UpdateKeyRequest {
        name: "keys/issuer".into(),
        min_version: Some(2),
        ..Default::default()
    })
    .await
    .unwrap();
    keys.set_legal_hold(SetLegalHoldRequest {
        name: v(2),
        reason: "case 2026-117".into(),
    })
    .await
    .unwrap();
    for kind in [
        OperationKind::Sign,
        OperationKind::Rotate,
        OperationKind::SetState,
    ] {
        source.gate("issuer", kind).await;
    }
}

token_test!(
    fn i3_a_restored_key_keeps_every_protection_it_had(token) {
        runtime().block_on(async {
            let backup = back_up_a_source(token, protected_issuer).await;
            let source = protections(&backup.keys["issuer"]);
            assert_eq!((source.policies.len(), source.min_version, source.versions.len()), (3, 2, 3));

            let dr = restored_whole(token, &backup).await;
            let operator = dr.client("operator").await;
            let signer = dr.client("ca-issuing").await;
            let restored = protections(&get_key(&operator, "issuer").await.unwrap());

            // The kinds issuer left to the source's administrative quorum
            // (2 of alice, bob and carol) come back written as its own: the
            // restoring daemon's administrative quorum, whatever its genesis
            // says, does not govern its destruction, its holds or its
            // policies.
            let mut governed = source.clone();
            for kind in ["DESTROY_VERSION", "RELEASE_LEGAL_HOLD", "SET_POLICY"] {
                let officers = ["alice", "bob", "carol"].map(String::from).to_vec();
                governed.policies.push((kind.to_string(), officers, 2));
            }
            governed.policies.sort();

            let mut harm = Vec::new();
            if restored != governed {
                harm.push(format!("GetKey differs:\n  source:   {governed:?}\n  restored: {restored:?}"));
            }
            // Directly after the restore, each alone.
            let primary = format!("keys/issuer/versions/{}", source.primary_version);
            harm.extend(unless_quorum_required(
                "ca-issuing's Sign with issuer",
                sign(&signer, "issuer", PAYLOAD).await,
            ));
            let suspended = set_state(&operator, &primary, KeyVersionState::Suspended, "").await;
            let was_suspended = suspended.is_ok();
            harm.extend(unless_quorum_required("the operator's suspension of the primary version", suspended));
            if was_suspended {
                harm.extend(unless_quorum_required(
                    "the operator's reactivation of it",
                    set_state(&operator, &primary, KeyVersionState::Active, "").await,
                ));
            }
            harm.extend(unless_quorum_required(
                "the operator's rotation of issuer",
                rotate(&operator, "issuer").await,
            ));
            assert!(harm.is_empty(), "the restore dropped issuer's protections:\n{}", harm.join("\n"));
        });
    }
);

token_test!(
    fn a_retired_key_is_given_no_new_version_after_a_restore(token) {
        runtime().block_on(async {
            // C29 across a restore. At the source `end` is retired: its
            // only version deactivated, and custodyd gives it no new
            // version on its own. Restored, the operator marks that
            // version compromised. Safe: the restored key is retired too,
            // so nothing rotates it back into use.
            let backup = back_up_a_source(token, async |source: &TestService| {
                with_v1_deactivated(&source.client("operator").await, "end", false).await;
            })
            .await;
            let dr = restored_whole(token, &backup).await;
            let operator = dr.client("operator").await;
            set_state(&operator, "keys/end/versions/1", KeyVersionState::Compromised, "tape found opened")
                .await
                .unwrap();
            let key = get_key(&operator, "end").await.unwrap();
            let signed = sign(&dr.client("ca-issuing").await, "end", PAYLOAD).await;
            assert!(
                key.versions.len() == 1 && signed.is_err(),
                "custodyd gave the restored retired key a new version ({} versions, primary {}); a Sign answers {signed:?}",
                key.versions.len(),
                key.primary_version
            );
        });
    }
);

token_test!(
    fn a_destruction_approved_at_the_source_is_carried_out_after_a_restore(token) {
        runtime().block_on(async {
            // I3 across a restore. At the source alice and bob approve the
            // destruction of `old` v1 (retired), scheduled 24 hours on. The
            // backup is restored before it runs. Safe: the restored version
            // is still scheduled under the quorum that approved it, and
            // destroyed once its window ends; not dropped as approved
            // under another quorum, which would bring it back into use.
            let backup = back_up_a_source(token, old_v1_to_be_destroyed).await;
            let dr = restored_whole(token, &backup).await;
            let operator = dr.client("operator").await;
            let v1 = async || get_key(&operator, "old").await.unwrap().versions[0].state();
            assert_eq!(v1().await, KeyVersionState::Deactivated);
            dr.clock.advance(25 * 3_600_000);
            for _ in 0..100 {
                if v1().await == KeyVersionState::Destroyed {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let scheduler: Vec<_> = dr
                .audit_events_since(0)
                .into_iter()
                .filter(|event| event.to_string().contains("ScheduledDestroy"))
                .collect();
            assert_eq!(
                v1().await,
                KeyVersionState::Destroyed,
                "the destruction approved at the source was not carried out after the restore; the scheduler: {scheduler:?}"
            );
        });
    }
);

/// At the source, `old` v1 (deactivated; v2 primary), whose destruction
/// alice and bob approve: scheduled one cancel window on.
async fn old_v1_to_be_destroyed(source: &TestService) {
    use custody_proto::v1::{VersionRef, operation_spec::Spec};
    let operator = source.client("operator").await;
    with_v1_deactivated(&operator, "old", true).await;
    let destroy = Spec::DestroyVersion(VersionRef {
        name: "keys/old/versions/1".into(),
    });
    requested_and_approved(source, destroy).await;
}

token_test!(
    fn a_destruction_past_due_in_an_older_bundle_waits_a_full_cancel_window_after_the_restore(token) {
        runtime().block_on(async {
            // I3 with a bundle older than the source's last word. At the
            // source (a cancel window of one second, its schedule never
            // ticking) v1's destruction is approved, then backed up; the
            // source may have cancelled or held it since, which the bundle
            // cannot tell. Restored once the schedule is past due. Safe:
            // the restored destruction waits a full cancel window here, so
            // the officers can cancel it again; it is not carried out at
            // the restoring daemon's first tick.
            let backup = back_up_a_source_configured(
                token,
                &kek_script("kek-1", "envelope-kek", false),
                |config| {
                    config.lifecycle.destroy_cancel_window_secs = 1;
                    config.lifecycle.scheduler_interval_secs = 3_600;
                },
                old_v1_to_be_destroyed,
            )
            .await;
            tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
            let dr = restored_whole(token, &backup).await;
            let operator = dr.client("operator").await;
            // Two turns of the restoring daemon's schedule (every second).
            tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
            let key = get_key(&operator, "old").await.unwrap();
            assert_eq!(
                key.versions[0].state(),
                KeyVersionState::Deactivated,
                "the restored destruction, past due in the bundle, was carried out before anyone here could cancel it"
            );
            // The restore's transcript names the schedule it brought back.
            let transcript = custody_proto::v1::ceremony_service_client::CeremonyServiceClient::new(
                dr.client("alice").await,
            )
            .get_transcript(custody_proto::v1::GetTranscriptRequest {
                name: "ceremonies/restore-1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .json;
            assert!(
                transcript.contains("keys/old/versions/1 is scheduled for destruction"),
                "the restore's transcript does not name the schedule it brought back: {transcript}"
            );
            KeyServiceClient::new(operator.clone())
                .cancel_destroy(custody_proto::v1::VersionRef {
                    name: "keys/old/versions/1".into(),
                })
                .await
                .expect("the officers here cancel the restored destruction within its window");
        });
    }
);
