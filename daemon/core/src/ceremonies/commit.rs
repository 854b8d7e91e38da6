//! The end of a ceremony that succeeds: the key registered under the
//! policies fixed when the ceremony opened, the ceremony marked completed
//! and its transcript sealed.

use serde_json::{Map, Value, json};

use super::crash_points::COMMIT;
use super::{intend, journal_failure, note, put, script_of, sign_transcript};
use crate::Custody;
use crate::authz::admin_quorum;
use crate::ceremony::journal::{CeremonyRecord, MadeKey, Phase};
use crate::ceremony::script::{KeySection, Script};
use crate::dual_control::operation::KeyPolicies;
use crate::failpoint;
use crate::keys::generation::KeyFacts;
use crate::registry::{KeyRecord, RegistryGuard};
use crate::{Error, Reason};

/// The policies the key of a root-key or kek script will be registered
/// with, decided when the ceremony opens: the script's `[key.policy]`, each
/// quorum at least as strong as the administrative one and naming only
/// enrolled officers, and the administrative quorum as it stands now on
/// each default kind the script does not name. None for a restore.
pub(super) fn policies_at_open(
    state: &Custody,
    script: &Script,
) -> Result<Option<KeyPolicies>, Error> {
    let Some(key) = script.key() else {
        return Ok(None);
    };
    let admin = admin_quorum(state)?;
    for (kind, quorum) in &key.policy {
        if quorum.required < admin.required {
            return Err(Error::new(
                Reason::BadPolicy,
                format!(
                    "key.policy.{kind}: {} approvals is weaker than the administrative quorum, which needs {}: a key made in a ceremony needs at least as many",
                    quorum.required, admin.required
                ),
            ));
        }
        if let Some(unknown) = quorum
            .members
            .iter()
            .find(|officer| !state.dual_control.enrolled(officer))
        {
            return Err(Error::new(
                Reason::BadPolicy,
                format!("key.policy.{kind}: {unknown} is not an enrolled officer"),
            ));
        }
    }
    Ok(Some(key.policies(&admin)))
}

/// The policies as the transcript records them: by kind, the officers and
/// M, and whether the script declared it or it is the administrative
/// quorum's.
pub(super) fn policies_detail(key: &KeySection, policies: &KeyPolicies) -> Value {
    let defaulted = key.defaulted_kinds();
    let by_kind: Map<String, Value> = policies
        .iter()
        .map(|(kind, quorum)| {
            let source = if defaulted.contains(&kind.as_str()) {
                "administrative quorum"
            } else {
                "script"
            };
            (
                kind.clone(),
                json!({
                    "officers": quorum.members,
                    "required": quorum.required,
                    "from": source,
                }),
            )
        })
        .collect();
    Value::Object(by_kind)
}

/// One line for the transcript's summary: `SIGN, ROTATE: administrative
/// quorum (2 of 3: alice, bob, carol); SET_STATE: 3 of 3: …`.
pub(super) fn policies_summary(key: &KeySection, policies: &KeyPolicies) -> String {
    let defaulted = key.defaulted_kinds();
    let describe = |quorum: &crate::dual_control::quorum::Quorum| {
        format!(
            "{} of {}: {}",
            quorum.required,
            quorum.members.len(),
            quorum
                .members
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut parts: Vec<String> = policies
        .iter()
        .filter(|(kind, _)| !defaulted.contains(&kind.as_str()))
        .map(|(kind, quorum)| format!("{kind}: {}", describe(quorum)))
        .collect();
    if let Some(admin) = defaulted.first().and_then(|kind| policies.get(*kind)) {
        parts.insert(
            0,
            format!(
                "{}: administrative quorum ({})",
                defaulted.join(", "),
                describe(admin)
            ),
        );
    }
    parts.join("; ")
}

/// Registers the key: from here it is usable.
pub(super) async fn commit(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    if let crate::ceremony::script::Kind::Intermediate { .. } = script.kind() {
        return super::certify::certify(state, record, script).await;
    }
    if let crate::ceremony::script::Kind::Crl(_) = script.kind() {
        return super::crl::sign_and_complete(state, record, script).await;
    }
    if let crate::ceremony::script::Kind::KeyDestruction(_) = script.kind() {
        return super::destruction::destroy_and_complete(state, record, script).await;
    }
    let made = record
        .key
        .clone()
        .ok_or_else(|| Error::internal("nothing to commit"))?;
    let _registry = open_commit(state, record).await?;
    if state.registry.get(&made.key_id).is_some() {
        return Err(Error::new(
            Reason::KeyExists,
            format!("key {} appeared while the ceremony ran", made.key_id),
        ));
    }
    let now = state.clock.now_ms();
    let signers: Vec<String> = script.key().map(|k| k.signers.clone()).unwrap_or_default();
    // Fixed when the ceremony opened; a record journaled before keys had
    // policies gets them as they would have been decided then, from now.
    let policies = match &record.key_policies {
        Some(policies) => policies.clone(),
        None => {
            let policies = policies_at_open(state, script)?.unwrap_or_default();
            record.key_policies = Some(policies.clone());
            policies
        }
    };
    state
        .registry
        .put(key_record(&made, signers, policies, now))
        .await
        .map_err(|e| journal_failure(e.to_string()))?;
    close_commit(state, record).await
}

fn key_record(
    made: &MadeKey,
    allowed_signers: Vec<String>,
    policies: KeyPolicies,
    now: i64,
) -> KeyRecord {
    let mut version = KeyFacts {
        public_key_der_hex: made.public_key_der_hex.clone(),
        public_key_pem: made.public_key_pem.clone(),
        check_value: made.check_value.clone(),
    }
    .active_version(1, made.hsm_label.clone(), now);
    // The root certificate the ceremony made, stored with the version it
    // certifies, so signers can fetch it with the key.
    if !made.certificate_pem.is_empty() {
        version.certificate_chain_pem = vec![made.certificate_pem.clone()];
    }
    KeyRecord {
        key_id: made.key_id.clone(),
        algorithm: made.algorithm.clone(),
        allowed_signers,
        primary_version: 1,
        // Active from the commit: until then the key was the ceremony's,
        // not usable.
        versions: vec![version],
        created_ms: now,
        policies,
        cryptoperiod_ms: None,
        min_version: 0,
        rotation_requests: Vec::new(),
        backup_exportable: made.backup,
        retired_at_version: None,
    }
}

/// The start of step `commit`: intended, then the registry locked; the
/// caller holds the lock until [`close_commit`] returns.
pub(super) async fn open_commit(
    state: &Custody,
    record: &mut CeremonyRecord,
) -> Result<RegistryGuard, Error> {
    intend(state, record, "commit", &[], &COMMIT).await?;
    crate::keys::lock(state).await
}

/// The end of step `commit`, once its registry write is done: the
/// ceremony completed, between the step's last two crash points.
pub(super) async fn close_commit(
    state: &Custody,
    record: &mut CeremonyRecord,
) -> Result<(), Error> {
    failpoint::hit(COMMIT.after_hsm);
    finish_completed(state, record).await?;
    failpoint::hit(COMMIT.after_result);
    Ok(())
}

/// Marks the ceremony completed, signs its transcript, and for a KEK
/// ceremony records its backup KEK among the token's (not the current one:
/// that takes an ACTIVATE_BACKUP_KEK operation, I1).
pub(super) async fn finish_completed(
    state: &Custody,
    record: &mut CeremonyRecord,
) -> Result<(), Error> {
    // Before anything journals the ceremony as completed: a completed KEK
    // ceremony whose backup KEK is not recorded would leave the KEK an
    // object nobody accounts for.
    if let Some(kek) = &record.backup_kek {
        state
            .ceremonies
            .journal
            .record_backup_kek(kek)
            .await
            .map_err(journal_failure)?;
    }
    record.phase = Phase::Completed;
    if !record.did("commit") {
        record.done.push("commit".into());
    }
    let mut detail = Map::new();
    let script = script_of(record)?;
    let summary = match (&record.key, script.key(), &record.key_policies) {
        (None, ..) if record.kind == "crl" => {
            let (issuer, number) = record
                .certification
                .as_ref()
                .map(|c| (c.issuer_key_id.clone(), c.crl_number.unwrap_or_default()))
                .unwrap_or_default();
            format!(
                "the CRL number {number} {issuer} signed is kept with the ceremony: ceremony completed"
            )
        }
        (None, ..) if record.kind == "key-destruction" => {
            let d = record.destruction.clone().unwrap_or_default();
            detail.insert("manifest_sha256".into(), json!(d.manifest_sha256));
            format!(
                "{} versions {:?} recorded destroyed, witnessed: ceremony completed",
                d.key_id,
                d.versions()
            )
        }
        (None, ..)
            if record
                .certification
                .as_ref()
                .is_some_and(|c| c.key_id.is_empty()) =>
        {
            // A CSR's key is not in custody: no version holds the
            // certificate; it is kept with the ceremony.
            "the certificate for the CSR is kept with the ceremony (ceremony status --certificate-out; the transcript): no custody key holds it: ceremony completed".to_string()
        }
        (None, ..) if record.certification.is_some() => {
            let c = record
                .certification
                .as_ref()
                .map(|c| (c.key_id.clone(), c.key_version));
            let (key_id, version) = c.unwrap_or_default();
            format!(
                "the chain [intermediate, root] stored with {key_id} v{version}, where its signers fetch it: ceremony completed"
            )
        }
        (Some(made), Some(key), Some(policies)) => {
            detail.insert("key_policies".into(), policies_detail(key, policies));
            format!(
                "{} registered and usable under its policy ({}): ceremony completed",
                made.key_id,
                policies_summary(key, policies)
            )
        }
        (Some(made), ..) => format!("{} registered and usable: ceremony completed", made.key_id),
        (None, ..) => "ceremony completed".to_string(),
    };
    if let Some(restore) = &record.restore {
        detail.insert("restore".into(), json!(restore));
    }
    record.transcript.outcome = "completed".into();
    note(state, record, "commit", "custodyd", summary, detail).await?;
    // From here the journal holds the ceremony completed. If the audit key
    // cannot sign the transcript now (a failing or hung HSM), the next
    // start signs it (`recovery.rs`, as after a kill at this point), and the
    // officers are told what is true: done, but not yet signed.
    if let Err(error) = sign_transcript(state, record).await {
        tracing::error!(ceremony = %record.id, %error, "a completed ceremony's transcript is unsigned until the next start");
        return Err(Error::new(
            error.reason,
            "the ceremony completed (what it made is registered and usable), but the audit key \
             could not sign its transcript yet; custodyd signs it at its next start",
        ));
    }
    put(state, record).await?;
    crate::metrics::ceremony_finished(&record.kind, "completed");
    Ok(())
}
