//! The end of a ceremony that succeeds: the key registered, the ceremony
//! marked completed and its transcript sealed.

use std::collections::BTreeMap;

use serde_json::{Map, json};

use super::crash_points::COMMIT;
use super::{intend, journal_failure, put, seal_transcript};
use crate::Custody;
use crate::ceremony::journal::{CeremonyRecord, MadeKey, Phase};
use crate::ceremony::script::Script;
use crate::failpoint;
use crate::keys::generation::KeyFacts;
use crate::registry::KeyRecord;
use crate::{Error, Reason};

/// Registers the key: from here it is usable.
pub(super) async fn commit(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let made = record
        .key
        .clone()
        .ok_or_else(|| Error::internal("nothing to commit"))?;
    intend(state, record, "commit", &[], &COMMIT).await?;
    let _registry = state.registry.lock().await;
    if state.registry.get(&made.key_id).is_some() {
        return Err(Error::new(
            Reason::KeyExists,
            format!("key {} appeared while the ceremony ran", made.key_id),
        ));
    }
    let now = state.clock.now_ms();
    let signers: Vec<String> = script.key().map(|k| k.signers.clone()).unwrap_or_default();
    state
        .registry
        .put(key_record(&made, signers, now))
        .await
        .map_err(|e| journal_failure(e.to_string()))?;
    failpoint::hit(COMMIT.after_hsm);
    finish_completed(state, record).await?;
    failpoint::hit(COMMIT.after_result);
    Ok(())
}

fn key_record(made: &MadeKey, allowed_signers: Vec<String>, now: i64) -> KeyRecord {
    KeyRecord {
        key_id: made.key_id.clone(),
        algorithm: made.algorithm.clone(),
        allowed_signers,
        primary_version: 1,
        // Active from the commit: until then the key was the ceremony's,
        // not usable.
        versions: vec![
            KeyFacts {
                public_key_der_hex: made.public_key_der_hex.clone(),
                public_key_pem: made.public_key_pem.clone(),
                check_value: made.check_value.clone(),
            }
            .active_version(1, made.hsm_label.clone(), now),
        ],
        created_ms: now,
        policies: BTreeMap::new(),
        cryptoperiod_ms: None,
        min_version: 0,
        rotation_requests: Vec::new(),
        backup_exportable: made.backup,
    }
}

/// Marks the ceremony completed, signs its transcript, and for a KEK
/// ceremony makes its backup KEK the token's.
pub(super) async fn finish_completed(
    state: &Custody,
    record: &mut CeremonyRecord,
) -> Result<(), Error> {
    // Before anything journals the ceremony as completed: a completed KEK
    // ceremony whose backup KEK is not the token's would leave the KEK an
    // object nobody accounts for.
    if let Some(kek) = &record.backup_kek {
        state
            .ceremonies
            .journal
            .register_backup_kek(kek)
            .await
            .map_err(journal_failure)?;
    }
    record.phase = Phase::Completed;
    if !record.did("commit") {
        record.done.push("commit".into());
    }
    let summary = match &record.key {
        Some(key) => format!("{} registered and usable: ceremony completed", key.key_id),
        None => "ceremony completed".to_string(),
    };
    let mut detail = Map::new();
    if let Some(restore) = &record.restore {
        detail.insert("restore".into(), json!(restore));
    }
    seal_transcript(state, record, "commit", "completed", summary, detail).await?;
    put(state, record).await?;
    crate::metrics::ceremony_finished(&record.kind, "completed");
    Ok(())
}
