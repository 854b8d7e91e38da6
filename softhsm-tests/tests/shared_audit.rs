//! One audit chain whoever writes it: several audit writers on one store
//! (replicas of custodyd on a shared store, two writers in one process here)
//! append concurrently, and the log stays one hash chain with no fork and no
//! gap, each record naming the writer that wrote it, each checkpoint naming
//! the record just before it (threat model S4).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use custody_core::audit::{AuditLog, CheckpointPolicy, Entry, Event, verify_records};
use custody_store::Store;
use softhsm_tests::{TestToken, token_test};

/// Appends from `writers` (each a log and its replica name) at once, with
/// checkpoints every few records; then checks the stored chain.
fn appends_from_every_writer_make_one_chain(writers: &[(AuditLog, &str)], each: u64) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let acknowledged: Vec<(u64, String)> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for (log, replica) in writers {
            for task in 0..4u64 {
                let (log, replica) = (log.clone(), replica.to_string());
                tasks.push(tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for n in 0..each / 4 {
                        let event = Event::Request {
                            principal: replica.clone(),
                            method: "Test".into(),
                            resource: format!("{task}/{n}"),
                            detail: String::new(),
                            outcome: "ok".into(),
                            request_id: None,
                        };
                        seqs.push((log.append(event).await.unwrap(), replica.clone()));
                    }
                    seqs
                }));
            }
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    let (log, _) = &writers[0];
    let stored: Vec<_> = log.records(1).map(Result::unwrap).collect();
    let report = verify_records(
        stored.clone().into_iter().map(Ok),
        Some(log.audit_key_spki()),
    );
    assert_eq!(report.first_bad, None, "the merged chain verifies");
    assert!(
        report.checkpoints > 0,
        "checkpoints landed under contention"
    );
    // Every acknowledged append is in the chain once, at the number it was
    // acknowledged with, naming the writer that acknowledged it.
    let by_seq: BTreeMap<u64, Entry> = stored
        .iter()
        .map(|r| (r.seq, serde_json::from_slice::<Entry>(&r.entry).unwrap()))
        .collect();
    assert_eq!(
        acknowledged.len() as u64,
        each / 4 * 4 * writers.len() as u64
    );
    let mut seen = std::collections::HashSet::new();
    for (seq, replica) in &acknowledged {
        assert!(seen.insert(*seq), "record {seq} acknowledged twice");
        let entry = &by_seq[seq];
        assert_eq!(
            entry.replica.as_deref(),
            Some(replica.as_str()),
            "record {seq}"
        );
        assert!(
            matches!(&entry.event, Event::Request { principal, .. } if principal == replica),
            "record {seq} holds what {replica} appended"
        );
    }
    // Records are numbered 1..=n with no gap (verify_records checks the
    // numbering), and each writer's records are there.
    for (_, replica) in writers {
        assert!(
            by_seq
                .values()
                .any(|e| e.replica.as_deref() == Some(*replica))
        );
    }
}

fn open_writer(store: &Store, token: &TestToken, replica: &str) -> AuditLog {
    let records = custody_core::audit::RecordHome::Store(store.clone());
    let checked = custody_core::integrity::check(store, &records);
    AuditLog::open(
        store,
        &records,
        &checked.chain,
        &token.open(),
        CheckpointPolicy {
            every: 25,
            interval: Duration::from_secs(3600),
        },
        Some(replica.to_string()),
    )
    .unwrap()
}

token_test!(
    fn two_writers_on_one_sled_store_keep_one_chain(token) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sled(&dir.path().join("db"), 16 << 20).unwrap();
        let writers = [
            (open_writer(&store, token, "replica-a"), "replica-a"),
            (open_writer(&store, token, "replica-b"), "replica-b"),
        ];
        appends_from_every_writer_make_one_chain(&writers, 400);
    }
);
