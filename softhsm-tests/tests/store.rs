//! What every store backend must do the same: ordered keyspaces, atomic
//! batches and serializable transactions. Each backend runs the same checks
//! on its real engine.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::sync::Arc;

use custody_store::{Batch, Store};

fn ordered_keyspaces(store: &Store) {
    let space = store.keyspace("ordered").unwrap();
    assert!(space.is_empty().unwrap());
    for n in [5u8, 1, 3, 2, 4] {
        space.insert([b'k', n], [n]).unwrap();
    }
    space.insert(b"other", b"x").unwrap();
    assert_eq!(space.get([b'k', 3]).unwrap(), Some(vec![3]));
    assert_eq!(space.get(b"absent").unwrap(), None);
    assert_eq!(space.len().unwrap(), 6);

    let keys: Vec<_> = space.scan_prefix(b"k").keys().map(Result::unwrap).collect();
    assert_eq!(keys, (1..=5).map(|n| vec![b'k', n]).collect::<Vec<_>>());
    let values: Vec<_> = space
        .range(vec![b'k', 2]..vec![b'k', 4])
        .values()
        .map(Result::unwrap)
        .collect();
    assert_eq!(values, vec![vec![2], vec![3]]);
    let reversed: Vec<_> = space
        .range_rev(vec![b'k', 2]..=vec![b'k', 4])
        .values()
        .map(Result::unwrap)
        .collect();
    assert_eq!(reversed, vec![vec![4], vec![3], vec![2]]);
    assert_eq!(space.first().unwrap().unwrap().0, vec![b'k', 1]);
    assert_eq!(space.last().unwrap().unwrap().0, b"other".to_vec());
    // An inverted range is empty, not an error.
    assert_eq!(space.range(vec![b'k', 4]..vec![b'k', 2]).count(), 0);

    space.remove([b'k', 3]).unwrap();
    space.remove(b"never there").unwrap();
    assert_eq!(space.get([b'k', 3]).unwrap(), None);
    assert_eq!(space.len().unwrap(), 5);
}

fn long_scans_page(store: &Store) {
    let space = store.keyspace("many").unwrap();
    let mut batch = Batch::default();
    for n in 0u32..1000 {
        batch.insert(&space, n.to_be_bytes(), n.to_le_bytes());
    }
    space.apply_batch(batch).unwrap();
    let forward: Vec<u32> = space
        .iter()
        .keys()
        .map(|key| u32::from_be_bytes(key.unwrap().try_into().unwrap()))
        .collect();
    assert_eq!(forward, (0..1000).collect::<Vec<_>>());
    let backward: Vec<u32> = space
        .iter_rev()
        .keys()
        .map(|key| u32::from_be_bytes(key.unwrap().try_into().unwrap()))
        .collect();
    assert_eq!(backward, (0..1000).rev().collect::<Vec<_>>());
}

fn keyspaces_are_listed_and_checks_make_none(store: &Store) {
    assert!(store.existing_keyspace("not made").unwrap().is_none());
    assert!(
        !store
            .keyspace_names()
            .unwrap()
            .iter()
            .any(|n| n == "not made")
    );
    store.keyspace("made").unwrap();
    assert!(store.existing_keyspace("made").unwrap().is_some());
    assert!(store.keyspace_names().unwrap().iter().any(|n| n == "made"));
    assert!(
        !store
            .keyspace_names()
            .unwrap()
            .iter()
            .any(|n| n == "not made")
    );
}

fn batches_span_keyspaces_atomically(store: &Store) {
    let a = store.keyspace("batch a").unwrap();
    let b = store.keyspace("batch b").unwrap();
    a.insert(b"gone", b"1").unwrap();
    let mut batch = Batch::default();
    batch.insert(&a, b"x", b"1");
    batch.insert(&b, b"y", b"2");
    batch.remove(&a, b"gone");
    a.apply_batch(batch).unwrap();
    assert_eq!(a.get(b"x").unwrap(), Some(b"1".to_vec()));
    assert_eq!(b.get(b"y").unwrap(), Some(b"2".to_vec()));
    assert_eq!(a.get(b"gone").unwrap(), None);
}

fn transactions_see_their_writes(store: &Store) {
    let a = store.keyspace("tx a").unwrap();
    let b = store.keyspace("tx b").unwrap();
    let undeclared = store.keyspace("tx c").unwrap();
    let seen = store
        .transaction(&[&a, &b], |tx| {
            tx.insert(&a, b"k", b"v")?;
            tx.insert(&b, b"k", b"w")?;
            tx.remove(&b, b"k")?;
            Ok((tx.get(&a, b"k")?, tx.get(&b, b"k")?))
        })
        .unwrap();
    assert_eq!(seen, (Some(b"v".to_vec()), None));
    assert_eq!(a.get(b"k").unwrap(), Some(b"v".to_vec()));
    assert_eq!(b.get(b"k").unwrap(), None);
    // A keyspace the transaction did not declare is refused, and nothing
    // the body wrote before lands.
    let refused = store.transaction(&[&a], |tx| {
        tx.insert(&a, b"partial", b"1")?;
        tx.insert(&undeclared, b"k", b"v")
    });
    assert!(refused.is_err());
    assert_eq!(a.get(b"partial").unwrap(), None);
    assert_eq!(undeclared.get(b"k").unwrap(), None);
}

/// Read-modify-write from many threads at once: a lost update would leave
/// the counter short, a torn one would leave the two keyspaces unequal.
fn transactions_are_serializable(store: &Store) {
    let counter = store.keyspace("counter").unwrap();
    let mirror = store.keyspace("counter mirror").unwrap();
    let (threads, each) = (8u64, 50u64);
    let store = Arc::new(store.clone());
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (store, counter, mirror) = (store.clone(), counter.clone(), mirror.clone());
            std::thread::spawn(move || {
                for _ in 0..each {
                    store
                        .transaction(&[&counter, &mirror], |tx| {
                            let now = tx
                                .get(&counter, b"n")?
                                .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                            tx.insert(&counter, b"n", (now + 1).to_be_bytes())?;
                            tx.insert(&mirror, (now + 1).to_be_bytes(), b"")?;
                            Ok(())
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let total = u64::from_be_bytes(counter.get(b"n").unwrap().unwrap().try_into().unwrap());
    assert_eq!(total, threads * each);
    assert_eq!(mirror.len().unwrap() as u64, threads * each);
}

fn conformance(store: &Store) {
    ordered_keyspaces(store);
    long_scans_page(store);
    keyspaces_are_listed_and_checks_make_none(store);
    batches_span_keyspaces_atomically(store);
    transactions_see_their_writes(store);
    transactions_are_serializable(store);
    store.flush().unwrap();
}

#[test]
fn sled_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sled(&dir.path().join("db"), 8 << 20).unwrap();
    conformance(&store);
}

#[test]
fn sled_writes_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open_sled(&dir.path().join("db"), 8 << 20).unwrap();
        store.keyspace("kept").unwrap().insert(b"k", b"v").unwrap();
        store.flush().unwrap();
    }
    let store = Store::open_sled(&dir.path().join("db"), 8 << 20).unwrap();
    assert_eq!(
        store.keyspace("kept").unwrap().get(b"k").unwrap(),
        Some(b"v".to_vec())
    );
}
