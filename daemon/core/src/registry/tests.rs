use super::*;

fn record(key_id: &str) -> KeyRecord {
    KeyRecord {
        key_id: key_id.into(),
        algorithm: "EC_SIGN_P256_SHA256".into(),
        allowed_signers: vec!["ca".into()],
        primary_version: 0,
        created_ms: 0,
        versions: Vec::new(),
        policies: Default::default(),
        cryptoperiod_ms: None,
        min_version: 0,
        rotation_requests: Vec::new(),
        backup_exportable: false,
        retired_at_version: None,
    }
}

/// Two registries on one store stand for two replicas.
fn replicas() -> (tempfile::TempDir, custody_store::Store, Registry, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let store = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
    let open = |holder| Registry::open(&store, &Epochs::open(&store, holder).unwrap()).unwrap();
    let (a, b) = (open("a"), open("b"));
    (dir, store, a, b)
}

#[tokio::test]
async fn a_replica_sees_another_replicas_change_and_never_writes_over_it() {
    let (_dir, store, a, b) = replicas();
    a.put(record("k1")).await.unwrap();
    assert!(b.get("k1").is_none(), "b's copy predates the change");
    b.refresh().unwrap();
    assert!(b.get("k1").is_some(), "a refresh brings it in");

    a.put(record("k2")).await.unwrap();
    // b decides from a stale copy: its write is fenced off, whole.
    let refused = b.put(record("k3")).await.unwrap_err();
    assert!(matches!(refused, RegistryError::Stale(_)), "{refused}");
    let fresh = Registry::open(&store, &Epochs::open(&store, "c").unwrap()).unwrap();
    assert_eq!(fresh.len(), 2, "nothing of the stale write landed");
    b.refresh().unwrap();
    b.put(record("k3")).await.unwrap();
    a.refresh().unwrap();
    assert_eq!(a.len(), 3);
}

/// A generation replaces an entry only its own process left; a late
/// roll-back of a generation whose entry is gone claims the label if
/// no version holds it (so what the stalled generation made there is
/// destroyed, and nothing begins under it meanwhile), and does not if
/// another generation's entry is there.
#[tokio::test]
async fn a_generation_replaces_only_its_own_process_s_leftover_and_a_late_roll_back_claims_a_free_label()
 {
    let (_dir, _store, a, b) = replicas();
    let entry = |instance: &str, generation: &str| PendingVersion {
        key_id: "k".into(),
        version: 1,
        hsm_label: "key/k/v1".into(),
        trigger: "create".into(),
        started_ms: 0,
        instance: instance.into(),
        abandoned: false,
        generation: generation.into(),
    };
    a.begin_version(&entry("a", "g1")).await.unwrap();
    a.begin_version(&entry("a", "g2")).await.unwrap();
    assert!(b.begin_version(&entry("b", "g3")).await.is_err());
    assert!(!a.begin_roll_back(&entry("a", "g1")).await.unwrap());
    a.abandon_version("key/k/v1", "g2").await.unwrap();
    assert!(a.begin_roll_back(&entry("a", "g1")).await.unwrap());
    assert!(
        b.begin_version(&entry("b", "g3")).await.is_err(),
        "a generation began under a label being rolled back"
    );
    a.abandon_version("key/k/v1", "g1").await.unwrap();
    b.begin_version(&entry("b", "g3")).await.unwrap();
}

/// Threat model S13: the leader rolls back the generation of a replica
/// it believes gone (marks it, destroys its objects, drops the entry).
/// A replica that only stalled past its lease and then commits must be
/// refused, or the registry holds a version whose objects are gone.
#[tokio::test]
async fn a_commit_over_a_generation_the_leader_rolled_back_is_refused() {
    let (_dir, store, maker, leader) = replicas();
    let pending = PendingVersion {
        key_id: "k".into(),
        version: 1,
        hsm_label: "key/k/v1".into(),
        trigger: "create".into(),
        started_ms: 0,
        instance: "stalled".into(),
        abandoned: false,
        generation: "g1".into(),
    };
    let made = || {
        let mut made = record("k");
        made.primary_version = 1;
        made.versions.push(VersionRecord {
            version: 1,
            state: VersionState::Active,
            created_ms: 0,
            state_ms: 0,
            hsm_label: pending.hsm_label.clone(),
            public_key_der_hex: String::new(),
            public_key_pem: String::new(),
            activated_ms: Some(0),
            destroy_at_ms: None,
            legal_hold: None,
            check_value: String::new(),
            certificate_chain_pem: Vec::new(),
            reserved_by: None,
            destroying_since_ms: None,
            destroy_approved_under: None,
        });
        made
    };
    // Marked for roll-back (before its objects are destroyed): the
    // maker's commit is refused, and nothing of it lands.
    maker.begin_version(&pending).await.unwrap();
    assert!(leader.begin_roll_back(&pending).await.unwrap());
    let committed = maker.commit_version(made(), &pending.hsm_label, "g1").await;
    assert!(
        matches!(committed, Err(CommitError::NotApplied(_))),
        "{committed:?}"
    );
    let fresh = Registry::open(&store, &Epochs::open(&store, "c").unwrap()).unwrap();
    assert!(fresh.get("k").is_none());
    // Dropped altogether: refused the same way.
    leader
        .abandon_version(&pending.hsm_label, "g1")
        .await
        .unwrap();
    let committed = maker.commit_version(made(), &pending.hsm_label, "g1").await;
    assert!(
        matches!(committed, Err(CommitError::NotApplied(_))),
        "{committed:?}"
    );
    // The label free again, another generation takes it (the leader's
    // own rotation): the stalled maker can neither commit over it nor
    // mark it for its roll-back, so it destroys nothing of it, and
    // cannot drop its entry.
    let again = PendingVersion {
        generation: "g2".into(),
        instance: "leader".into(),
        ..pending.clone()
    };
    leader.begin_version(&again).await.unwrap();
    let over = PendingVersion {
        generation: "g3".into(),
        ..pending.clone()
    };
    assert!(
        maker.begin_version(&over).await.is_err(),
        "a generation under way is never overwritten"
    );
    let committed = maker.commit_version(made(), &pending.hsm_label, "g1").await;
    assert!(
        matches!(committed, Err(CommitError::NotApplied(_))),
        "{committed:?}"
    );
    assert!(!maker.begin_roll_back(&pending).await.unwrap());
    maker
        .abandon_version(&pending.hsm_label, "g1")
        .await
        .unwrap();
    leader.refresh().unwrap();
    leader
        .commit_version(made(), &pending.hsm_label, "g2")
        .await
        .unwrap();
    // Committed first: the roll-back finds nothing to mark, and so
    // destroys nothing.
    let second = PendingVersion {
        hsm_label: "key/k2/v1".into(),
        key_id: "k2".into(),
        ..pending.clone()
    };
    maker.begin_version(&second).await.unwrap();
    let mut made2 = made();
    made2.key_id = "k2".into();
    made2.versions[0].hsm_label = second.hsm_label.clone();
    maker.refresh().unwrap();
    maker
        .commit_version(made2, &second.hsm_label, "g1")
        .await
        .unwrap();
    assert!(!leader.begin_roll_back(&second).await.unwrap());
}

#[tokio::test]
async fn one_replica_at_a_time_holds_the_registry_lock_and_takes_it_fresh() {
    let (_dir, _store, a, b) = replicas();
    let held = a.lock().await.unwrap();
    a.put(record("k1")).await.unwrap();
    let waiting = tokio::time::timeout(std::time::Duration::ZERO, b.lock()).await;
    assert!(waiting.is_err(), "b took the lock a holds");
    drop(held);
    let _held = b.lock().await.unwrap();
    assert!(
        b.get("k1").is_some(),
        "taking the lock brought b's copy up to date"
    );
    b.put(record("k2")).await.unwrap();
}

/// The start opens the registry from its integrity check's pass (each
/// record parsed once, by the rule `load` reads by: an old record's
/// active version gets its activation time), at the epoch read before
/// the check: a replica's change after the check is brought in by the
/// next refresh, not hidden behind a newer epoch.
#[tokio::test]
async fn the_registry_opened_from_the_check_is_the_loaded_one_and_refreshes() {
    let (_dir, store, a, _b) = replicas();
    let mut old = record("k1");
    old.versions.push(VersionRecord {
        version: 1,
        state: VersionState::Active,
        created_ms: 7,
        state_ms: 7,
        hsm_label: "key/k1/v1".into(),
        public_key_der_hex: String::new(),
        public_key_pem: String::new(),
        activated_ms: None,
        destroy_at_ms: None,
        legal_hold: None,
        check_value: String::new(),
        certificate_chain_pem: Vec::new(),
        reserved_by: None,
        destroying_since_ms: None,
        destroy_approved_under: None,
    });
    old.primary_version = 1;
    a.put(old).await.unwrap();
    let epochs = Epochs::open(&store, "c").unwrap();
    let epoch = epochs.read(Domain::Registry).unwrap();
    let mut findings = crate::findings::Findings::default();
    let checked = check_stored(&store, &mut findings);
    assert!(findings.is_empty(), "{findings:?}");
    a.put(record("k2")).await.unwrap();
    let started = Registry::from_checked(&store, &epochs, epoch, checked).unwrap();
    let loaded = Registry::open(&store, &Epochs::open(&store, "d").unwrap()).unwrap();
    let k1 = started.get("k1").unwrap();
    assert_eq!(k1.versions[0].activated_ms, Some(7));
    assert_eq!(
        serde_json::to_string(&*k1).unwrap(),
        serde_json::to_string(&*loaded.get("k1").unwrap()).unwrap()
    );
    assert!(started.get("k2").is_none(), "the check ran before k2");
    started.refresh().unwrap();
    assert!(started.get("k2").is_some(), "the refresh brings k2 in");
}
