//! The key-destruction scenario of the SIGKILL-per-point test: `d-<run>`
//! created, rotated, v1 deactivated and its destruction approved by alice
//! and bob; a key-destruction ceremony over v1 opened at once (reserving
//! it), the rig's cancel window waited out, the quorum signing in (the
//! manifest), both confirming (the destroy step). The rig's custodyd is a
//! build with crash points, the only kind that accepts a cancel window
//! under an hour (threat model C27): the rig sets [`WINDOW_SECS`].

use std::time::Duration;

use custody_core::identity::Role;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{
    CeremonyState, GetKeyRequest, KeyVersionState, OperationState, RotateKeyRequest,
    SetKeyVersionStateRequest, VersionRef, operation_spec,
};
use softhsm_tests::TestToken;
use softhsm_tests::ceremony::Officers;
use softhsm_tests::process::{Pki, connect};
use softhsm_tests::service::{reason, request_operation};

/// The rig's cancel window (its config's `[lifecycle]`).
pub(super) const WINDOW_SECS: u64 = 2;

/// The ceremony id prefix of this scenario.
const PREFIX: &str = "ceremonies/c-destroy-";

/// The rig's config lines for this scenario.
pub(super) fn lifecycle_section() -> String {
    format!("[lifecycle]\ndestroy_cancel_window_secs = {WINDOW_SECS}\n")
}

/// The script of run `run` (ceremony `c-destroy-<run><again>`, over
/// `d-<run>` v1).
pub(super) fn script(run: &str, again: &str) -> String {
    include_str!("../../../deploy/ceremonies/key-destruction.toml")
        .replace(
            "\"destroy-old-root-2026\"",
            &format!("\"c-destroy-{run}{again}\""),
        )
        .replace("key = \"old-root\"", &format!("key = \"d-{run}\""))
}

/// The key a ceremony of this scenario destroys a version of.
fn key_of(ceremony: &str) -> Option<String> {
    ceremony
        .strip_prefix(PREFIX)
        .map(|run| format!("d-{}", run.split('-').next().unwrap_or(run)))
}

async fn keys(pki: &Pki, port: u16) -> KeyServiceClient<tonic::transport::Channel> {
    let operator = connect(pki, port, &pki.client("operator", &[Role::Operator]))
        .await
        .unwrap();
    KeyServiceClient::new(operator)
}

/// `d-<run>` with v1 retired (v2 primary) and v1's destruction approved
/// by alice and bob: scheduled [`WINDOW_SECS`] from now.
pub(super) async fn schedule(pki: &Pki, port: u16, officers: &Officers<'_>, run: usize) {
    let key = format!("d-{run}");
    let operator = connect(pki, port, &pki.client("operator", &[Role::Operator]))
        .await
        .unwrap();
    softhsm_tests::service::create_key(&operator, &key, "EC_SIGN_P256_SHA256", None).await;
    let mut keys = KeyServiceClient::new(operator.clone());
    keys.rotate_key(RotateKeyRequest {
        name: format!("keys/{key}"),
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = format!("keys/{key}/versions/1");
    keys.set_key_version_state(SetKeyVersionStateRequest {
        name: v1.clone(),
        state: KeyVersionState::Deactivated as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let destroy = operation_spec::Spec::DestroyVersion(VersionRef { name: v1 });
    let operation = request_operation(&operator, destroy).await.unwrap();
    officers.approve("alice", &operation).await.unwrap();
    let done = officers.approve("bob", &operation).await.unwrap();
    assert_eq!(
        done.state,
        OperationState::Succeeded as i32,
        "{}",
        done.error
    );
}

/// Drives the ceremony over the version [`schedule`] scheduled: opened
/// at once (so the scheduler leaves v1 to it), the window waited out,
/// then the sign-ins (manifest) and confirmations (destroy). An error is
/// where custodyd died.
pub(super) async fn drive(
    officers: &Officers<'_>,
    script: &str,
) -> Result<custody_proto::v1::Ceremony, tonic::Status> {
    let name = officers.start("alice", script, "").await?.name;
    // Not an assertion on time: the ceremony refuses (NOT_DUE) until the
    // window is over, and the test then says it never reached its point.
    tokio::time::sleep(Duration::from_secs(WINDOW_SECS + 1)).await;
    officers.sign_in("alice", &name, script).await?;
    let waiting = officers.sign_in("bob", &name, script).await?;
    let manifest = waiting.fingerprint.map(|f| f.value).unwrap_or_default();
    officers.confirm("alice", &name, script, &manifest).await?;
    officers.confirm("bob", &name, script, &manifest).await
}

/// Whether an object labelled `label` is on the main token, by SoftHSM2's
/// own listing in a process of its own.
fn on_token(token: &TestToken, label: &str) -> bool {
    let listed = token.pkcs11_tool().arg("--list-objects").output().unwrap();
    assert!(listed.status.success(), "pkcs11-tool: {listed:?}");
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.trim().strip_prefix("label:").map(str::trim) == Some(label))
}

/// The invariant after a kill and restart, at any moment: v1 is recorded
/// DESTROYED exactly when no object of it is left on the token (never
/// destroyed while the registry says present, never marked destroyed with
/// its object still there); v2, the primary, untouched; a completed
/// ceremony destroyed v1.
pub(super) async fn invariant(
    pki: &Pki,
    port: u16,
    token: &TestToken,
    ceremony: &str,
    state: CeremonyState,
) {
    let Some(key) = key_of(ceremony) else {
        return;
    };
    let found = keys(pki, port)
        .await
        .get_key(GetKeyRequest {
            name: format!("keys/{key}"),
        })
        .await
        .unwrap()
        .into_inner();
    let v1 = found.versions.iter().find(|v| v.version == 1).unwrap();
    let v2 = found.versions.iter().find(|v| v.version == 2).unwrap();
    let destroyed = v1.state == KeyVersionState::Destroyed as i32;
    let present = on_token(token, &format!("key/{key}/v1"));
    assert_ne!(
        destroyed, present,
        "{ceremony} is {state:?}: v1 recorded destroyed {destroyed}, its object on the token {present}"
    );
    assert_eq!(found.primary_version, 2, "{ceremony}");
    assert_eq!(v2.state, KeyVersionState::Active as i32, "{ceremony}");
    assert!(
        on_token(token, &format!("key/{key}/v2")),
        "{ceremony}: v2 gone"
    );
    if state == CeremonyState::Completed {
        assert!(destroyed, "{ceremony} completed without destroying v1");
    }
}

/// The end a kill at `point` must come to: from the first object's
/// intent on (the destroy step's `after_intent` and later) nothing can be
/// undone, so the ceremony is finished after the restart, never rolled
/// back (a roll-back there would leave its destruction unwitnessed, to the
/// scheduler).
pub(super) fn check_end(point: &str, ended: CeremonyState) {
    let finished = [
        "ceremony.destroy_versions.after_intent",
        "ceremony.destroy_versions.after_hsm",
        "ceremony.destroy_versions.after_result",
    ];
    if finished.contains(&point) {
        assert_eq!(ended, CeremonyState::Completed, "killed at {point}");
    }
}

/// After a ceremony that ended without completing: its reservation is
/// gone. Either the scheduler already carried the approved destruction
/// out, or a new ceremony over v1 opens, runs and destroys it (a
/// reservation left behind refuses it, `RESERVED_BY_CEREMONY`).
pub(super) async fn released(
    pki: &Pki,
    port: u16,
    token: &TestToken,
    officers: &Officers<'_>,
    ceremony: &str,
) {
    let Some(run) = ceremony.strip_prefix(PREFIX) else {
        return;
    };
    let again = script(run, "-again");
    match officers.run(&again).await {
        Ok((done, _)) => {
            assert_eq!(
                done.state,
                CeremonyState::Completed as i32,
                "after {ceremony}: {}",
                done.error
            );
            let name = format!("{PREFIX}{run}-again");
            invariant(pki, port, token, &name, CeremonyState::Completed).await;
        }
        // The scheduler carried it out first: released too.
        Err(status) if reason(&status) == "ALREADY_DESTROYED" => {
            invariant(pki, port, token, ceremony, CeremonyState::Completed).await;
        }
        Err(status) => panic!("after {ceremony} ended, v1 cannot be destroyed: {status:?}"),
    }
}
