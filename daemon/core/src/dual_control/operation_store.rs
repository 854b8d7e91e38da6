//! Operations in the store, with the indexes that keep what runs often bounded
//! by what it needs, not by how many operations were ever made (threat
//! model R2):
//!
//! | tree | key → value | read by |
//! |---|---|---|
//! | `operations` | id → the record (JSON) | everything |
//! | `operations_pending` | id → expiry (8 bytes BE) ‖ requester | the expiry sweep, the per-requester cap, pending lists |
//! | `operations_by_time` | created (8 bytes BE) ‖ id → state | lists of officers and auditors, newest first |
//! | `operations_by_requester` | requester ‖ 0 ‖ created ‖ id → state | a requester's own list |
//! | `operations_finished` | finished (8 bytes BE) ‖ id → created ‖ requester | pruning after the retention period |
//!
//! A record and its index entries change in one atomic batch, flushed
//! before the change is acknowledged. Stores made before the indexes
//! existed are indexed once, at open.

use std::sync::{Mutex, PoisonError};

use custody_store::Batch;

use super::operation::{OperationRecord, OperationState};

/// The key in `dual_control` saying the indexes are built.
pub(super) const INDEXED: &[u8] = b"operations_indexed_v1";

/// Where a page of a list starts: just after (older than) this operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// When the last operation listed was requested.
    pub created_ms: i64,
    /// Its id.
    pub id: String,
}

impl Cursor {
    fn of(record: &OperationRecord) -> Cursor {
        Cursor {
            created_ms: record.created_ms,
            id: record.id.clone(),
        }
    }

    /// The opaque page token clients pass back.
    pub fn token(&self) -> String {
        hex::encode(time_id(self.created_ms, &self.id))
    }

    /// Reads a page token; `None` if it is not one [`Self::token`] made.
    pub fn parse(token: &str) -> Option<Cursor> {
        let bytes = hex::decode(token).ok()?;
        if bytes.len() != 8 + ID_LEN {
            return None;
        }
        let (time, id) = bytes.split_at(8);
        let id = std::str::from_utf8(id).ok()?;
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Cursor {
            created_ms: i64::from_be_bytes(time.try_into().ok()?),
            id: id.to_string(),
        })
    }
}

/// Which operations a list covers.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Everyone's (officers and auditors).
    All,
    /// Those `requester` asked for.
    RequestedBy(&'a str),
}

/// One page of a list.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Newest first.
    pub operations: Vec<OperationRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// Operation ids are 32 hex digits.
const ID_LEN: usize = 32;

/// Most index entries one page may scan for a state filter: a page may come
/// back short (with a next token) rather than scan without bound.
pub const MAX_SCANNED_PER_PAGE: usize = 10_000;

fn time_id(ms: i64, id: &str) -> Vec<u8> {
    [ms.to_be_bytes().as_slice(), id.as_bytes()].concat()
}

fn requester_key(requester: &str, created_ms: i64, id: &str) -> Vec<u8> {
    [requester.as_bytes(), &[0], &time_id(created_ms, id)].concat()
}

fn state_byte(state: OperationState) -> u8 {
    match state {
        OperationState::Pending => 0,
        OperationState::Succeeded => 1,
        OperationState::Failed => 2,
        OperationState::Denied => 3,
        OperationState::Expired => 4,
    }
}

/// The metric names of the states, in [`state_byte`] order.
const STATE_NAMES: [&str; 5] = ["pending", "succeeded", "failed", "denied", "expired"];

fn i64_at(bytes: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// When a finished operation finished, for pruning (records made before
/// `finished_ms` existed: their expiry, which is no earlier).
fn finished_at(record: &OperationRecord) -> i64 {
    record.finished_ms.unwrap_or(record.expires_ms)
}

fn error(e: impl std::fmt::Display) -> String {
    format!("operation store: {e}")
}

/// Operations and their indexes.
pub struct OperationStore {
    db: custody_store::Store,
    records: custody_store::Keyspace,
    pending: custody_store::Keyspace,
    by_time: custody_store::Keyspace,
    by_requester: custody_store::Keyspace,
    finished: custody_store::Keyspace,
    /// Operations in the store by state (a gauge), kept as they change.
    counts: Mutex<[usize; 5]>,
}

impl OperationStore {
    /// Every keyspace a put or a prune writes.
    pub fn keyspaces(&self) -> [&custody_store::Keyspace; 5] {
        [
            &self.records,
            &self.pending,
            &self.by_time,
            &self.by_requester,
            &self.finished,
        ]
    }

    /// Opens the trees in `db`; indexes a store made before the indexes.
    pub fn open(
        db: &custody_store::Store,
        meta: &custody_store::Keyspace,
    ) -> Result<OperationStore, String> {
        let tree = |name: &str| db.keyspace(name).map_err(error);
        let store = OperationStore {
            db: db.clone(),
            records: tree("operations")?,
            pending: tree("operations_pending")?,
            by_time: tree("operations_by_time")?,
            by_requester: tree("operations_by_requester")?,
            finished: tree("operations_finished")?,
            counts: Mutex::new([0; 5]),
        };
        let indexed = meta.get(INDEXED).map_err(error)?.is_some();
        let mut counts = [0; 5];
        // One pass over the records at start: the counts, and the indexes
        // of a store that predates them.
        for record in store.all()? {
            counts[usize::from(state_byte(record.state))] += 1;
            if !indexed {
                store.index(&record)?;
            }
        }
        if !indexed {
            meta.insert(INDEXED, [1]).map_err(error)?;
            store.db.flush().map_err(error)?;
        }
        *store.counts.lock().unwrap_or_else(PoisonError::into_inner) = counts;
        Ok(store)
    }

    /// Writes the index entries of `record` (outside a transaction: only
    /// while indexing an old store at open).
    fn index(&self, record: &OperationRecord) -> Result<(), String> {
        let state = [state_byte(record.state)];
        self.by_time
            .insert(time_id(record.created_ms, &record.id), state)
            .map_err(error)?;
        self.by_requester
            .insert(
                requester_key(&record.requester, record.created_ms, &record.id),
                state,
            )
            .map_err(error)?;
        if record.state == OperationState::Pending {
            self.pending
                .insert(record.id.as_bytes(), pending_value(record))
                .map_err(error)?;
        } else {
            self.finished
                .insert(
                    time_id(finished_at(record), &record.id),
                    finished_value(record),
                )
                .map_err(error)?;
        }
        Ok(())
    }

    /// One operation.
    pub fn get(&self, id: &str) -> Result<Option<OperationRecord>, String> {
        match self.records.get(id.as_bytes()).map_err(error)? {
            Some(bytes) => crate::stored::open(id.as_bytes(), &bytes)
                .map(Some)
                .map_err(|e| error(format!("corrupt operation {id}: {e}"))),
            None => Ok(None),
        }
    }

    /// Every operation in the store (unordered). Reads them all: for start
    /// and for tests, never for what runs per request or per tick.
    pub fn all(&self) -> Result<Vec<OperationRecord>, String> {
        self.records
            .iter()
            .map(|item| {
                let (id, bytes) = item.map_err(error)?;
                crate::stored::open(&id, &bytes).map_err(|e| {
                    error(format!(
                        "corrupt operation {}: {e}",
                        String::from_utf8_lossy(&id)
                    ))
                })
            })
            .collect()
    }

    /// Writes `record` and its index entries in one atomic batch, durably:
    /// `commit` applies the batch (the dual-control store's fenced commit).
    /// Callers hold the dual-control lock, so no two writes race: besides
    /// ordering the writes of one operation, it keeps the sled backend's
    /// optimistic transactions (which carry a batch over several keyspaces)
    /// from retrying against each other (many at once were seen to livelock
    /// in an optimised build).
    pub async fn put<E: From<String>>(
        &self,
        record: &OperationRecord,
        commit: impl FnOnce(Batch) -> Result<(), E>,
    ) -> Result<(), E> {
        let before = self.get(&record.id)?.map(|r| r.state);
        let bytes = crate::stored::seal(record.id.as_bytes(), record).map_err(error)?;
        let state = [state_byte(record.state)];
        let by_time_key = time_id(record.created_ms, &record.id);
        let by_requester_key = requester_key(&record.requester, record.created_ms, &record.id);
        let pending = (record.state == OperationState::Pending).then(|| pending_value(record));
        let finished_key = time_id(finished_at(record), &record.id);
        let finished_value = finished_value(record);
        let mut batch = Batch::default();
        batch.insert(&self.records, record.id.as_bytes(), bytes);
        batch.insert(&self.by_time, by_time_key, state);
        batch.insert(&self.by_requester, by_requester_key, state);
        match pending {
            Some(value) => batch.insert(&self.pending, record.id.as_bytes(), value),
            None => {
                batch.remove(&self.pending, record.id.as_bytes());
                batch.insert(&self.finished, finished_key, finished_value);
            }
        }
        commit(batch)?;
        self.flush().await?;
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(before) = before {
            let slot = &mut counts[usize::from(state_byte(before))];
            *slot = slot.saturating_sub(1);
        }
        counts[usize::from(state[0])] += 1;
        Ok(())
    }

    /// The pending operations: what the expiry sweep reads, O(pending).
    pub fn pending(&self) -> Result<Vec<OperationRecord>, String> {
        let mut records = Vec::new();
        for item in self.pending.iter().keys() {
            let id = item.map_err(error)?;
            let id = String::from_utf8_lossy(&id);
            if let Some(record) = self.get(&id)? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// How many operations `requester` has pending, and the earliest of
    /// their expiries. Reads the pending index only.
    pub fn pending_of(&self, requester: &str) -> Result<(usize, Option<i64>), String> {
        let (mut count, mut earliest) = (0, None::<i64>);
        for item in self.pending.iter().values() {
            let value = item.map_err(error)?;
            if value.get(8..) == Some(requester.as_bytes()) {
                count += 1;
                if let Some(expires) = i64_at(&value, 0) {
                    earliest = Some(earliest.map_or(expires, |e| e.min(expires)));
                }
            }
        }
        Ok((count, earliest))
    }

    /// Operations by state, as kept since start.
    pub fn counts(&self) -> [(&'static str, usize); 5] {
        let counts = *self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        std::array::from_fn(|i| (STATE_NAMES[i], counts[i]))
    }

    /// One page of the operations in `scope`, in `state` if given, newest
    /// first, starting after `after`. Work is bounded by the page: a
    /// pending list reads the pending index; any other reads at most
    /// [`MAX_SCANNED_PER_PAGE`] index entries.
    pub fn page(
        &self,
        scope: Scope<'_>,
        state: Option<OperationState>,
        after: Option<&Cursor>,
        size: usize,
    ) -> Result<Page, String> {
        if state == Some(OperationState::Pending) {
            return self.pending_page(scope, after, size);
        }
        let (tree, prefix) = match scope {
            Scope::All => (&self.by_time, Vec::new()),
            Scope::RequestedBy(requester) => {
                (&self.by_requester, [requester.as_bytes(), &[0]].concat())
            }
        };
        let end = match after {
            Some(cursor) => [prefix.as_slice(), &time_id(cursor.created_ms, &cursor.id)].concat(),
            None => [prefix.as_slice(), &[0xff; 9]].concat(),
        };
        let wanted = state.map(state_byte);
        let mut page = Page::default();
        let mut scanned = 0;
        let mut last = None;
        for item in tree.range_rev(prefix.clone()..end) {
            let (key, value) = item.map_err(error)?;
            scanned += 1;
            let time_id = &key[prefix.len()..];
            let cursor = Cursor {
                created_ms: i64_at(time_id, 0).unwrap_or_default(),
                id: String::from_utf8_lossy(&time_id[8..]).into_owned(),
            };
            if wanted.is_none_or(|w| value.first() == Some(&w)) {
                if page.operations.len() == size {
                    // One more exists: the page ends at the last one listed.
                    page.next = last;
                    return Ok(page);
                }
                if let Some(record) = self.get(&cursor.id)? {
                    page.operations.push(record);
                }
            }
            last = Some(cursor);
            if scanned >= MAX_SCANNED_PER_PAGE {
                // Bounded: hand back what was found and where to go on.
                page.next = last;
                return Ok(page);
            }
        }
        Ok(page)
    }

    fn pending_page(
        &self,
        scope: Scope<'_>,
        after: Option<&Cursor>,
        size: usize,
    ) -> Result<Page, String> {
        let mut pending = self.pending()?;
        if let Scope::RequestedBy(requester) = scope {
            pending.retain(|r| r.requester == requester);
        }
        let key = |r: &OperationRecord| (r.created_ms, r.id.clone());
        pending.sort_by_key(|r| std::cmp::Reverse(key(r)));
        if let Some(cursor) = after {
            pending.retain(|r| key(r) < (cursor.created_ms, cursor.id.clone()));
        }
        let next = (pending.len() > size).then(|| Cursor::of(&pending[size - 1]));
        pending.truncate(size);
        Ok(Page {
            operations: pending,
            next,
        })
    }

    /// The ids of up to `max` operations that finished before `before_ms`,
    /// oldest first.
    pub fn finished_before(&self, before_ms: i64, max: usize) -> Result<Vec<String>, String> {
        self.finished
            .range(..before_ms.to_be_bytes().to_vec())
            .keys()
            .take(max)
            .map(|key| {
                let key = key.map_err(error)?;
                Ok(String::from_utf8_lossy(key.get(8..).unwrap_or_default()).into_owned())
            })
            .collect()
    }

    /// Removes finished operations `ids` and their index entries, in one
    /// transaction (`commit` applies it), durably. Returns how many were
    /// removed.
    pub async fn prune<E: From<String>>(
        &self,
        ids: &[String],
        commit: impl FnOnce(Batch) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut doomed = Vec::new();
        for id in ids {
            if let Some(record) = self.get(id)? {
                if record.state != OperationState::Pending {
                    doomed.push(record);
                }
            }
        }
        let mut batch = Batch::default();
        for record in &doomed {
            batch.remove(&self.records, record.id.as_bytes());
            batch.remove(&self.by_time, time_id(record.created_ms, &record.id));
            batch.remove(
                &self.by_requester,
                requester_key(&record.requester, record.created_ms, &record.id),
            );
            batch.remove(&self.finished, time_id(finished_at(record), &record.id));
        }
        commit(batch)?;
        self.flush().await?;
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        for record in &doomed {
            let slot = &mut counts[usize::from(state_byte(record.state))];
            *slot = slot.saturating_sub(1);
        }
        Ok(doomed.len())
    }

    async fn flush(&self) -> Result<(), String> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(|e| error(format!("flush: {e}")))
    }
}

/// Checks the stored operations and their indexes (threat model F1):
/// every record decodes, is stored under its own id, and still has the
/// digest its officers sign (recomputed from its terms); each record has
/// exactly its index entries, with its state, and every index entry points
/// to a record. Point lookups per record and per entry: no table of ids is
/// held. A store not yet indexed (`indexed` false) is indexed at open, so
/// its indexes are not checked.
pub fn check_stored(
    db: &custody_store::Store,
    indexed: bool,
    findings: &mut crate::findings::Findings,
) {
    use crate::findings::{each_record, existing_tree, json_record};
    let trees: Result<Vec<Option<custody_store::Keyspace>>, custody_store::StoreError> = [
        "operations",
        "operations_pending",
        "operations_by_time",
        "operations_by_requester",
        "operations_finished",
    ]
    .iter()
    .map(|name| existing_tree(db, name))
    .collect();
    let Ok(trees) = trees else {
        return findings.unreadable("operations", "opening the operation trees");
    };
    let get = |tree: usize, key: &[u8]| -> Option<Vec<u8>> {
        trees[tree].as_ref().and_then(|t| t.get(key).ok().flatten())
    };
    each_record(db, "operations", findings, |id, bytes, findings| {
        let Some(record) = json_record::<OperationRecord>(
            "operations",
            id,
            bytes,
            "an operation record",
            findings,
        ) else {
            return;
        };
        if record.id.as_bytes() != id {
            findings.add(
                "operations",
                id,
                format!(
                    "expected the operation stored under its id, found {:?}",
                    record.id
                ),
            );
            return;
        }
        if record.digest != hex::encode(record.compute_digest()) {
            findings.add(
                "operations",
                id,
                "expected the digest its officers sign, recomputed from its terms; they differ",
            );
        }
        if !indexed {
            return;
        }
        let state = [state_byte(record.state)];
        let mut expect =
            |tree: usize, name: &'static str, key: Vec<u8>, value: Vec<u8>| match get(tree, &key) {
                Some(found) if found == value => {}
                Some(_) => findings.add(
                    name,
                    &key,
                    format!(
                        "expected the entry of operation {} as its record gives it",
                        record.id
                    ),
                ),
                None => findings.add(
                    name,
                    &key,
                    format!(
                        "expected an entry for operation {} (tree `operations`)",
                        record.id
                    ),
                ),
            };
        expect(
            2,
            "operations_by_time",
            time_id(record.created_ms, &record.id),
            state.to_vec(),
        );
        expect(
            3,
            "operations_by_requester",
            requester_key(&record.requester, record.created_ms, &record.id),
            state.to_vec(),
        );
        if record.state == OperationState::Pending {
            expect(
                1,
                "operations_pending",
                record.id.clone().into_bytes(),
                pending_value(&record),
            );
        } else {
            expect(
                4,
                "operations_finished",
                time_id(finished_at(&record), &record.id),
                finished_value(&record),
            );
        }
    });
    if !indexed {
        return;
    }
    // Every index entry names a record, by the id at the end of its key.
    type IdOf = fn(&[u8]) -> Option<&[u8]>;
    let id_of: [(&'static str, IdOf); 4] = [
        ("operations_pending", |key| Some(key)),
        ("operations_by_time", |key| key.get(8..)),
        ("operations_by_requester", |key| {
            let at = key.iter().position(|b| *b == 0)?;
            key.get(at + 9..)
        }),
        ("operations_finished", |key| key.get(8..)),
    ];
    for (tree, id_of) in id_of {
        each_record(db, tree, findings, |key, _, findings| {
            let found = id_of(key).is_some_and(|id| get(0, id).is_some());
            if !found {
                findings.add(
                    tree,
                    key,
                    "expected an operation this entry indexes in tree `operations`, found none",
                );
            }
        });
    }
}

fn pending_value(record: &OperationRecord) -> Vec<u8> {
    [
        record.expires_ms.to_be_bytes().as_slice(),
        record.requester.as_bytes(),
    ]
    .concat()
}

fn finished_value(record: &OperationRecord) -> Vec<u8> {
    [
        record.created_ms.to_be_bytes().as_slice(),
        record.requester.as_bytes(),
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;
    use crate::dual_control::operation::Spec;
    use crate::dual_control::quorum::{Ballot, Quorum};

    fn record(n: u32, requester: &str, state: OperationState) -> OperationRecord {
        OperationRecord {
            id: format!("{n:032x}"),
            spec: Spec::Rotate { key_id: "k".into() },
            requester: requester.into(),
            requester_officer: None,
            nonce: "00".into(),
            created_ms: i64::from(n) * 10,
            expires_ms: i64::from(n) * 10 + 5,
            quorum: Quorum::new(["a".to_string(), "b".into()], 2).unwrap(),
            digest: String::new(),
            ballot: Ballot::default(),
            state,
            outcome: None,
            error: None,
            finished_ms: (state != OperationState::Pending).then_some(i64::from(n) * 10 + 1),
        }
    }

    fn open() -> (custody_store::Store, OperationStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        let meta = db.keyspace("dual_control").unwrap();
        let store = OperationStore::open(&db, &meta).unwrap();
        (db, store)
    }

    /// Applies a batch unfenced (the store alone, without the dual-control
    /// store's epochs).
    fn plain(store: &OperationStore, batch: Batch) -> Result<(), String> {
        store.records.apply_batch(batch).map_err(|e| e.to_string())
    }

    fn ids(page: &Page) -> Vec<u32> {
        page.operations
            .iter()
            .map(|r| u32::from_str_radix(&r.id, 16).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn indexes_follow_every_change_and_pages_cover_each_operation_once() {
        let (_db, store) = open();
        for n in 1..=25 {
            let requester = if n % 2 == 0 { "even" } else { "odd" };
            let state = if n % 5 == 0 {
                OperationState::Pending
            } else {
                OperationState::Succeeded
            };
            store
                .put(&record(n, requester, state), |b| plain(&store, b))
                .await
                .unwrap();
        }
        assert_eq!(store.pending().unwrap().len(), 5);
        assert_eq!(store.pending_of("odd").unwrap(), (3, Some(55)));
        assert_eq!(store.pending_of("nobody").unwrap(), (0, None));
        // All, newest first, in pages of 7.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.page(Scope::All, None, after.as_ref(), 7).unwrap();
            assert!(page.operations.len() <= 7);
            seen.extend(ids(&page));
            match page.next {
                Some(next) => after = Some(Cursor::parse(&next.token()).unwrap()),
                None => break,
            }
        }
        assert_eq!(seen, (1..=25).rev().collect::<Vec<_>>());
        // A requester's own, and a state filter.
        let odd = store
            .page(Scope::RequestedBy("odd"), None, None, 100)
            .unwrap();
        assert_eq!(
            ids(&odd),
            (1..=25).rev().filter(|n| n % 2 == 1).collect::<Vec<_>>()
        );
        let pending = store
            .page(
                Scope::RequestedBy("even"),
                Some(OperationState::Pending),
                None,
                1,
            )
            .unwrap();
        assert_eq!(ids(&pending), [20]);
        let rest = store
            .page(
                Scope::RequestedBy("even"),
                Some(OperationState::Pending),
                pending.next.as_ref(),
                1,
            )
            .unwrap();
        assert_eq!(ids(&rest), [10]);
        assert!(rest.next.is_none());
        // Finishing a pending one moves it between the indexes.
        let mut done = record(25, "odd", OperationState::Expired);
        done.finished_ms = Some(1000);
        store.put(&done, |b| plain(&store, b)).await.unwrap();
        assert_eq!(store.pending_of("odd").unwrap().0, 2);
        let expired = store
            .page(Scope::All, Some(OperationState::Expired), None, 100)
            .unwrap();
        assert_eq!(ids(&expired), [25]);
        let counts = store.counts();
        assert_eq!(counts[0], ("pending", 4));
        assert_eq!(counts[4], ("expired", 1));
    }

    #[tokio::test]
    async fn pruning_removes_finished_operations_and_nothing_pending() {
        let (_db, store) = open();
        for n in 1..=10 {
            let state = if n == 3 {
                OperationState::Pending
            } else {
                OperationState::Denied
            };
            store
                .put(&record(n, "r", state), |b| plain(&store, b))
                .await
                .unwrap();
        }
        // Finished at n*10+1: those before 52 are 1, 2, 4 and 5.
        let due = store.finished_before(52, 100).unwrap();
        assert_eq!(due.len(), 4);
        assert_eq!(store.finished_before(52, 2).unwrap().len(), 2);
        assert_eq!(store.prune(&due, |b| plain(&store, b)).await.unwrap(), 4);
        assert!(store.get(&format!("{:032x}", 1)).unwrap().is_none());
        let all = store.page(Scope::All, None, None, 100).unwrap();
        assert_eq!(ids(&all), [10, 9, 8, 7, 6, 3]);
        let mine = store
            .page(Scope::RequestedBy("r"), None, None, 100)
            .unwrap();
        assert_eq!(ids(&mine), [10, 9, 8, 7, 6, 3]);
        assert_eq!(store.pending_of("r").unwrap().0, 1);
        assert!(store.finished_before(52, 100).unwrap().is_empty());
        assert_eq!(store.counts()[3], ("denied", 5));
    }

    #[tokio::test]
    async fn an_old_store_is_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        let records = db.keyspace("operations").unwrap();
        for n in 1..=4 {
            let state = if n == 4 {
                OperationState::Pending
            } else {
                OperationState::Failed
            };
            let mut old = record(n, "r", state);
            old.finished_ms = None;
            records
                .insert(old.id.as_bytes(), serde_json::to_vec(&old).unwrap())
                .unwrap();
        }
        let meta = db.keyspace("dual_control").unwrap();
        let store = OperationStore::open(&db, &meta).unwrap();
        assert_eq!(store.pending().unwrap().len(), 1);
        assert_eq!(
            ids(&store.page(Scope::All, None, None, 10).unwrap()),
            [4, 3, 2, 1]
        );
        // Finished before `finished_ms` existed: pruned by expiry (n*10+5).
        assert_eq!(store.finished_before(26, 10).unwrap().len(), 2);
    }

    #[test]
    fn page_tokens_are_checked() {
        let cursor = Cursor {
            created_ms: 1_700_000_000_000,
            id: "0123456789abcdef0123456789abcdef".into(),
        };
        assert_eq!(Cursor::parse(&cursor.token()), Some(cursor.clone()));
        for bad in [
            "",
            "zz",
            &cursor.token()[2..],
            &format!("{}00", cursor.token()),
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }
}
