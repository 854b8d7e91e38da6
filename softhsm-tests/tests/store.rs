//! What every store backend must do the same: ordered keyspaces, atomic
//! batches, serializable transactions and exclusive claims. Each backend
//! runs the same checks on its real engine: sled in a temp dir, etcd as a
//! real 3-member cluster (`softhsm_tests::etcd`). Then what only a
//! replicated store has to survive: replicas racing, members killed, the
//! whole cluster down, holders dying, requests over the cluster's limits.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use custody_store::{Batch, ClaimError, EtcdConfig, Store, StoreError};
use softhsm_tests::etcd::Cluster;

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
    // Batches of 100: etcd refuses a transaction of more than 128 writes by
    // default (see `etcd_oversized_batches_are_refused_naming_the_limit`).
    for start in (0u32..1000).step_by(100) {
        let mut batch = Batch::default();
        for n in start..start + 100 {
            batch.insert(&space, n.to_be_bytes(), n.to_le_bytes());
        }
        space.apply_batch(batch).unwrap();
    }
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

/// Read-modify-write from many threads at once, spread over `stores` (one
/// process's store, or several replicas' on one cluster): a lost update
/// would leave the counter short, a torn one would leave the two keyspaces
/// unequal.
fn transactions_are_serializable(stores: &[Store]) {
    let (threads, each) = (8u64, 50u64);
    let workers: Vec<_> = (0..threads)
        .map(|n| {
            let store = stores[n as usize % stores.len()].clone();
            let counter = store.keyspace("counter").unwrap();
            let mirror = store.keyspace("counter mirror").unwrap();
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
    let counter = stores[0].keyspace("counter").unwrap();
    let mirror = stores[0].keyspace("counter mirror").unwrap();
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
    transactions_are_serializable(std::slice::from_ref(store));
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
    // sled's background threads let go of the directory lock a moment
    // after the last handle is dropped: the reopening waits for that.
    let mut reopened = Store::open_sled(&dir.path().join("db"), 8 << 20);
    for _ in 0..100 {
        if reopened.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        reopened = Store::open_sled(&dir.path().join("db"), 8 << 20);
    }
    let store = reopened.unwrap();
    assert_eq!(
        store.keyspace("kept").unwrap().get(b"k").unwrap(),
        Some(b"v".to_vec())
    );
}

/// What every backend's claims do: a second holder is refused with the
/// first's name, a dropped claim frees the name, and a campaign waits for
/// the holder to let go. Returns the campaign's claim (`engine`, held by
/// `replica-c`).
async fn claims_conform(store: &Store) -> custody_store::Claim {
    let ttl = Duration::from_secs(2);
    let first = store.claim("engine", "replica-a", ttl).unwrap();
    assert!(first.is_held());
    assert_eq!(
        store.claim("engine", "replica-b", ttl).unwrap_err(),
        ClaimError::Held {
            holder: "replica-a".into()
        }
    );
    // Other names are independent.
    let other = store.claim("scheduler", "replica-b", ttl).unwrap();
    drop(other);
    drop(first);
    let second = store.claim("engine", "replica-b", ttl).unwrap();
    assert_eq!(second.holder(), "replica-b");

    // A campaign started while the name is held ends holding it, and only
    // after the holder let go.
    let released = Arc::new(AtomicBool::new(false));
    let campaign = {
        let (store, released) = (store.clone(), released.clone());
        tokio::spawn(async move {
            let claim = store.campaign("engine", "replica-c", ttl).await.unwrap();
            (claim, released.load(Ordering::SeqCst))
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    released.store(true, Ordering::SeqCst);
    drop(second);
    let (claim, after_release) = tokio::time::timeout(Duration::from_secs(60), campaign)
        .await
        .expect("campaign never acquired a released claim")
        .unwrap();
    assert!(after_release, "campaign acquired while another held");
    assert!(claim.is_held());
    assert_eq!(
        store.claim("engine", "replica-a", ttl).unwrap_err(),
        ClaimError::Held {
            holder: "replica-c".into()
        }
    );
    claim
}

#[tokio::test]
async fn sled_claims_conform() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sled(&dir.path().join("db"), 8 << 20).unwrap();
    let _held = claims_conform(&store).await;
}

/// On a multi-thread runtime's worker, to run the blocking API the way the
/// daemon's handlers do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_conforms() {
    let cluster = Cluster::start(3);
    let store = Store::open_etcd(&cluster.config("conformance/")).unwrap();
    assert_eq!(store.backend_name(), "etcd");
    conformance(&store);
    // Another prefix is another store.
    let other = Store::open_etcd(&cluster.config("other/")).unwrap();
    assert!(other.existing_keyspace("ordered").unwrap().is_none());
}

/// On a current-thread runtime (as `#[tokio::test]` runs), where the store
/// must not use `block_in_place`.
#[tokio::test]
async fn etcd_claims_conform() {
    let cluster = Cluster::start(3);
    let store = Store::open_etcd(&cluster.config("claims/")).unwrap();
    let held = claims_conform(&store).await;
    // Two replicas: the same name is exclusive across stores.
    let replica = Store::open_etcd(&cluster.config("claims/")).unwrap();
    assert_eq!(
        replica
            .claim("engine", "replica-d", Duration::from_secs(2))
            .unwrap_err(),
        ClaimError::Held {
            holder: "replica-c".into()
        }
    );
    drop(held);
    let taken = replica
        .claim("engine", "replica-d", Duration::from_secs(2))
        .unwrap();
    assert!(taken.is_held());
}

/// S1: two replicas' stores on one cluster run the counter together, and a
/// transaction whose read another replica overwrites before it commits runs
/// again on the new value.
#[test]
fn etcd_transactions_serializable_across_replicas() {
    let cluster = Cluster::start(3);
    let a = Store::open_etcd(&cluster.config("replicas/")).unwrap();
    let b = Store::open_etcd(&cluster.config("replicas/")).unwrap();
    transactions_are_serializable(&[a.clone(), b.clone()]);

    let space_a = a.keyspace("race").unwrap();
    let space_b = b.keyspace("race").unwrap();
    space_a.insert(b"n", 10u64.to_be_bytes()).unwrap();
    let runs = AtomicUsize::new(0);
    let seen = a
        .transaction(&[&space_a], |tx| {
            let now = u64::from_be_bytes(tx.get(&space_a, b"n")?.unwrap().try_into().unwrap());
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                // The other replica writes between this read and the commit.
                space_b.insert(b"n", 100u64.to_be_bytes()).unwrap();
            }
            tx.insert(&space_a, b"n", (now + 1).to_be_bytes())?;
            Ok(now)
        })
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the conflict went unseen");
    assert_eq!(seen, 100);
    assert_eq!(
        space_b.get(b"n").unwrap(),
        Some(101u64.to_be_bytes().to_vec())
    );

    // A transaction that only reads sees one snapshot: another replica
    // moving both keys at once between its two reads shows as neither
    // or both, never one of them.
    let mut both = Batch::default();
    both.insert(&space_a, b"x", b"old");
    both.insert(&space_a, b"y", b"old");
    space_a.apply_batch(both).unwrap();
    let (x, y) = a
        .transaction(&[&space_a], |tx| {
            let x = tx.get(&space_a, b"x")?;
            let mut both = Batch::default();
            both.insert(&space_b, b"x", b"new");
            both.insert(&space_b, b"y", b"new");
            space_b.apply_batch(both).unwrap();
            Ok((x, tx.get(&space_a, b"y")?))
        })
        .unwrap();
    assert_eq!(x, y, "a torn read");
}

/// S1: a transaction whose pinned revision is compacted away while it runs
/// starts over at the newest revision, and sees what was written meanwhile.
#[test]
fn etcd_a_transaction_whose_revision_is_compacted_starts_over() {
    let cluster = Cluster::start(3);
    let store = Store::open_etcd(&cluster.config("compacted/")).unwrap();
    let space = store.keyspace("s").unwrap();
    space.insert(b"n", [1]).unwrap();
    let runs = AtomicUsize::new(0);
    let seen = store
        .transaction(&[&space], |tx| {
            // The first read fixes the revision the others are read at.
            let first = tx.get(&space, b"absent")?;
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                space.insert(b"n", [2]).unwrap();
                cluster.compact();
            }
            let n = tx.get(&space, b"n")?;
            tx.insert(&space, b"copy", n.clone().unwrap())?;
            Ok((first, n))
        })
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(seen, (None, Some(vec![2])));
    assert_eq!(space.get(b"copy").unwrap(), Some(vec![2]));
}

/// S2: a writer keeps writing while the member it talks to is SIGKILLed.
/// Calls in flight may fail, as `Unavailable` and nothing else; the writer
/// goes on through the other two; every acknowledged write is there, on the
/// survivors and on the killed member once it is back.
#[test]
fn etcd_writes_survive_a_member_killed() {
    let mut cluster = Cluster::start(3);
    let store = Store::open_etcd(&cluster.config("kill/")).unwrap();
    let space = store.keyspace("writes").unwrap();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let (total, kill_after) = (300u32, 50usize);
    let writer = {
        let (space, acknowledged) = (space.clone(), acknowledged.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut failures = Vec::new();
            for n in 0..total {
                match space.insert(n.to_be_bytes(), n.to_le_bytes()) {
                    Ok(()) => {
                        acked.push(n);
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.push((n, e)),
                }
            }
            (acked, failures)
        })
    };
    while acknowledged.load(Ordering::SeqCst) < kill_after && !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The store talks to member 0 first.
    cluster.kill(0);
    let (acked, failures) = writer.join().unwrap();
    for (n, failure) in &failures {
        assert!(
            matches!(failure, StoreError::Unavailable(_)),
            "write {n} failed with {failure:?}"
        );
    }
    // Only the writes around the kill may fail (the one in flight, and one
    // sent while a new leader is elected, if the killed member led): a run
    // of a few, after which every write succeeds.
    let failed: Vec<u32> = failures.iter().map(|(n, _)| *n).collect();
    if let (Some(first), Some(last)) = (failed.first(), failed.last()) {
        assert_eq!(
            failed,
            (*first..=*last).collect::<Vec<_>>(),
            "writes failed again after succeeding: {failures:?}"
        );
        assert!(failed.len() <= 5, "writes kept failing: {failures:?}");
    }
    assert_eq!(acked.len() + failed.len(), total as usize);
    assert!(
        acked.last() == Some(&(total - 1)),
        "the last write did not succeed"
    );
    for n in &acked {
        assert_eq!(
            space.get(n.to_be_bytes()).unwrap(),
            Some(n.to_le_bytes().to_vec())
        );
    }
    // Transactions and new writes go on with one member down.
    space.insert(b"after", b"kill").unwrap();
    store
        .transaction(&[&space], |tx| tx.insert(&space, b"tx", b"after kill"))
        .unwrap();

    // The killed member, back, has every acknowledged write.
    cluster.restart(0);
    let mut alone = cluster.config("kill/");
    alone.endpoints.truncate(1);
    let member0 = Store::open_etcd(&alone).unwrap();
    let space0 = member0.keyspace("writes").unwrap();
    for n in &acked {
        assert_eq!(
            space0.get(n.to_be_bytes()).unwrap(),
            Some(n.to_le_bytes().to_vec())
        );
    }
    assert_eq!(space0.get(b"tx").unwrap(), Some(b"after kill".to_vec()));

    // Losing the member a store talks to while it is idle costs nothing but
    // time: once the others have a leader, every call works at once (each
    // moves on to a live member within the call).
    let fresh = Store::open_etcd(&cluster.config("kill/")).unwrap();
    let space = fresh.keyspace("writes").unwrap();
    assert_eq!(space.get(b"after").unwrap(), Some(b"kill".to_vec()));
    cluster.kill(0);
    cluster.wait_healthy(1);
    cluster.wait_healthy(2);
    // A write first: it must move on, and may, as it was never sent.
    space.insert(b"idle", b"kill").unwrap();
    assert_eq!(space.get(b"after").unwrap(), Some(b"kill".to_vec()));
    fresh
        .transaction(&[&space], |tx| tx.insert(&space, b"tx", b"idle kill"))
        .unwrap();
    drop(
        fresh
            .claim("engine", "replica-a", Duration::from_secs(2))
            .unwrap(),
    );
    // A write that failed as Unavailable may still have been committed
    // (its outcome is unknown, as the store documents); nothing else is
    // there.
    let landed = failed
        .iter()
        .filter(|n| space.get(n.to_be_bytes()).unwrap().is_some())
        .count();
    assert_eq!(space.len().unwrap(), acked.len() + landed + 3);
    eprintln!(
        "{total} writes: {} acknowledged, none lost; {} Unavailable ({landed} of them landed)",
        acked.len(),
        failed.len()
    );
}

/// With every member down, each kind of call ends in `Unavailable` within
/// the request deadline, not in a hang, and so does opening a store, naming
/// the endpoints: first with the members frozen (they hold their
/// connections and answer nothing, so only the deadline ends a call), then
/// with them killed (connections refused).
#[test]
fn etcd_all_members_down_is_unavailable() {
    let mut cluster = Cluster::start(3);
    let mut config = cluster.config("down/");
    config.request_timeout = Duration::from_secs(2);
    let store = Store::open_etcd(&config).unwrap();
    let space = store.keyspace("s").unwrap();
    space.insert(b"k", b"v").unwrap();
    let endpoints = cluster.endpoints();
    // On a thread of its own, so that a hang fails the test instead of
    // stalling the run (a bound, not a timing assertion: calls end within
    // the 2 s deadline).
    let every_call_unavailable = |how: &'static str| {
        let (store, space, config, endpoints) = (
            store.clone(),
            space.clone(),
            config.clone(),
            endpoints.clone(),
        );
        let (done, finished) = std::sync::mpsc::channel();
        let checks = std::thread::spawn(move || {
            let unavailable = |what: &str, outcome: custody_store::Result<()>| match outcome {
                Err(StoreError::Unavailable(_)) => {}
                other => panic!("{what} with every member {how}: {other:?}"),
            };
            unavailable("get", space.get(b"k").map(drop));
            unavailable("insert", space.insert(b"k", b"w"));
            unavailable("scan", space.iter().next().unwrap().map(drop));
            unavailable("len", space.len().map(drop));
            unavailable(
                "transaction",
                store.transaction(&[&space], |tx| tx.insert(&space, b"k", b"x")),
            );
            unavailable("new keyspace", store.keyspace("new").map(drop));
            match store.claim("engine", "replica-a", Duration::from_secs(2)) {
                Err(ClaimError::Store(StoreError::Unavailable(_))) => {}
                other => panic!("claim with every member {how}: {other:?}"),
            }
            match Store::open_etcd(&config) {
                Err(StoreError::Unavailable(why)) => {
                    for endpoint in &endpoints {
                        assert!(why.contains(endpoint), "{why} does not name {endpoint}");
                    }
                }
                other => panic!("open with every member {how}: {other:?}"),
            }
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(120)) {
            Ok(()) => checks.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(checks.join().unwrap_err())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("calls with every member {how} hung")
            }
        }
    };
    for i in 0..3 {
        cluster.pause(i);
    }
    every_call_unavailable("frozen");
    for i in 0..3 {
        cluster.kill(i);
    }
    every_call_unavailable("killed");
}

/// S3: a holder that can no longer renew its lease stops holding: with the
/// cluster gone, `lost` resolves and `is_held` turns false (before etcd
/// itself could let another holder in).
#[tokio::test]
async fn etcd_claim_lost_when_the_cluster_is_gone() {
    let mut cluster = Cluster::start(3);
    let store = Store::open_etcd(&cluster.config("lost/")).unwrap();
    let claim = store
        .claim("scheduler", "replica-a", Duration::from_secs(2))
        .unwrap();
    assert!(claim.is_held());
    for i in 0..3 {
        cluster.kill(i);
    }
    tokio::time::timeout(Duration::from_secs(60), claim.lost())
        .await
        .expect("a claim that cannot be renewed was never lost");
    assert!(!claim.is_held());
}

const HOLDER_ENV: &str = "CUSTODY_TEST_ETCD_HOLDER";
const HOLDING: &str = "holder process: claim held";

/// A child process, killed when dropped (a failing test must not leave it).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// S3: a holder process SIGKILLed without releasing its claim keeps others
/// out while its lease lives, and a campaign takes the claim over once the
/// lease expired.
#[tokio::test]
async fn etcd_claim_taken_over_after_the_holder_dies() {
    if let Ok(config) = std::env::var(HOLDER_ENV) {
        // The holder, in a child process: claim, say so, wait to be killed.
        let fields: Vec<&str> = config.split('\n').collect();
        let mut config = EtcdConfig::new(
            fields[0].split(',').map(str::to_string).collect(),
            fields[1].into(),
            fields[2].into(),
            fields[3].into(),
        );
        config.prefix = "takeover/".into();
        let store = Store::open_etcd(&config).unwrap();
        let _claim = store
            .claim("engine", "replica-child", Duration::from_secs(2))
            .unwrap();
        // On a line of its own: libtest may have started one.
        writeln!(std::io::stdout().lock(), "\n{HOLDING}").unwrap();
        std::thread::sleep(Duration::from_secs(120));
        panic!("the holder was never killed");
    }
    let cluster = Cluster::start(3);
    let tls = cluster.tls();
    let mut child = Killed(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "etcd_claim_taken_over_after_the_holder_dies",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                HOLDER_ENV,
                format!(
                    "{}\n{}\n{}\n{}",
                    cluster.endpoints().join(","),
                    tls.ca.display(),
                    tls.cert.display(),
                    tls.key.display()
                ),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|line| line.unwrap() == HOLDING),
        "the holder process never held the claim"
    );
    let store = Store::open_etcd(&cluster.config("takeover/")).unwrap();
    let ttl = Duration::from_secs(2);
    assert_eq!(
        store.claim("engine", "replica-parent", ttl).unwrap_err(),
        ClaimError::Held {
            holder: "replica-child".into()
        }
    );
    // Dies without a word: no revoke, the lease runs out.
    drop(child);
    let claim = tokio::time::timeout(
        Duration::from_secs(60),
        store.campaign("engine", "replica-parent", ttl),
    )
    .await
    .expect("the claim was never taken over")
    .unwrap();
    assert!(claim.is_held());
    assert_eq!(claim.holder(), "replica-parent");
}

/// A batch over the cluster's `--max-txn-ops` or `--max-request-bytes` is
/// refused whole, naming the limit: by the store, and by etcd itself when
/// the store is told the cluster allows more than it does.
#[test]
fn etcd_oversized_batches_are_refused_naming_the_limit() {
    let cluster = Cluster::start(3);
    let refused = |config: &EtcdConfig, flag: &str| {
        let store = Store::open_etcd(config).unwrap();
        let space = store.keyspace("big").unwrap();
        let mut too_many = Batch::default();
        for n in 0u32..=128 {
            too_many.insert(&space, n.to_be_bytes(), b"v");
        }
        let mut too_large = Batch::default();
        too_large.insert(&space, b"first", b"v");
        too_large.insert(&space, b"huge", vec![7u8; 2 << 20]);
        for (batch, flag) in [(too_many, "--max-txn-ops"), (too_large, flag)] {
            match space.apply_batch(batch) {
                Err(StoreError::Failed(why)) => assert!(why.contains(flag), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(space.is_empty().unwrap(), "part of a refused batch landed");
        // At the limit, it lands.
        let mut full = Batch::default();
        for n in 0u32..128 {
            full.insert(&space, n.to_be_bytes(), b"v");
        }
        space.apply_batch(full).unwrap();
        assert_eq!(space.len().unwrap(), 128);
    };
    refused(&cluster.config("limits/"), "--max-request-bytes");
    let mut trusting = cluster.config("limits-server/");
    trusting.max_txn_ops = 10_000;
    trusting.max_request_bytes = 64 << 20;
    // etcd refuses 2 MiB at its gRPC limit (--max-request-bytes plus 512 KiB
    // of overhead) or at its own check, naming neither flag the same way.
    refused(&trusting, "--max-request-bytes");
}

/// A TCP relay to an etcd member that can turn silent: it then cuts the
/// connections it relayed and takes new ones without a word, as a member
/// whose process is alive but stuck before TLS would.
struct Relay {
    addr: std::net::SocketAddr,
    silent: Arc<AtomicBool>,
    held: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    relayed: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn to(member: &str) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            silent: Arc::default(),
            held: Arc::default(),
            relayed: Arc::default(),
        };
        let (silent, held, relayed) = (
            relay.silent.clone(),
            relay.held.clone(),
            relay.relayed.clone(),
        );
        let member = member.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if silent.load(Ordering::SeqCst) {
                    held.lock().unwrap().push(client);
                    continue;
                }
                let Ok(upstream) = std::net::TcpStream::connect(&member) else {
                    continue;
                };
                relayed.lock().unwrap().push(client.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(upstream, client);
            }
        });
        relay
    }

    /// Cuts what it relays, and from now on answers nothing.
    fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
        for connection in self.relayed.lock().unwrap().drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The connections taken since it went silent.
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

/// A member that takes the connection and never answers it (alive, but
/// stuck before TLS) is passed over by a write: the write was sent
/// nowhere, so it moves on to the next member within its deadline instead
/// of failing with an outcome it calls unknown.
#[test]
fn etcd_a_write_passes_over_a_member_that_takes_the_connection_and_never_answers() {
    let cluster = Cluster::start(1);
    let member = cluster.endpoints().remove(0);
    let relay = Relay::to(member.trim_start_matches("https://"));
    let mut config = cluster.config("silent/");
    config.endpoints = vec![format!("https://{}", relay.addr), member];
    config.request_timeout = Duration::from_secs(4);
    let store = Store::open_etcd(&config).unwrap();
    let space = store.keyspace("writes").unwrap();
    // Through the relay: the store talks to the first member first.
    space.insert(b"before", b"relayed").unwrap();
    relay.go_silent();
    // Time for the channel to see its connection end; the next call makes
    // a new one.
    std::thread::sleep(Duration::from_millis(300));
    match space.insert(b"after", b"passed over") {
        Ok(()) => {}
        Err(error) => panic!("the write failed: {error:?}"),
    }
    assert!(
        relay.held() >= 1,
        "the write never tried the silent member, so this shows nothing"
    );
    assert_eq!(space.get(b"after").unwrap(), Some(b"passed over".to_vec()));
    assert_eq!(space.get(b"before").unwrap(), Some(b"relayed".to_vec()));
}
