//! The durable per-version nonce budget: how many AES-GCM encryptions each
//! key version has made. Random 96-bit nonces stay unique with the
//! probability NIST SP 800-38D (section 8.3) requires only up to 2^32
//! encryptions per key, so the budget refuses the one past the configured
//! limit, and the scheduler rotates a key at half of it.

use std::collections::HashMap;

/// A version has made all the encryptions it may.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The limit is reached: rotate the key.
    #[error("{label} has made its {limit} encryptions; rotate the key")]
    Exhausted {
        /// The version's HSM label.
        label: String,
        /// The limit.
        limit: u64,
    },
    /// The count could not be made durable.
    #[error("nonce budget store: {0}")]
    Store(String),
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    used: u64,
    reserved: u64,
}

/// Encryptions per version, counted durably in blocks: before the count
/// passes what is stored, the next block is reserved and flushed. A crash
/// loses at most the unused rest of a block, which counts as used, so the
/// count never goes below the truth.
pub struct NonceBudget {
    db: custody_store::Store,
    tree: custody_store::Keyspace,
    limit: u64,
    block: u64,
    counters: tokio::sync::Mutex<HashMap<String, Counter>>,
}

impl NonceBudget {
    /// Opens the budget in `db`, with `limit` encryptions per version.
    pub fn open(db: &custody_store::Store, limit: u64) -> Result<NonceBudget, String> {
        let tree = db
            .keyspace("nonce_budget")
            .map_err(|e| format!("nonce budget: {e}"))?;
        Ok(NonceBudget {
            db: db.clone(),
            tree,
            limit: limit.max(1),
            block: (limit / 1024).clamp(1, 65536),
            counters: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The limit per version.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn stored(&self, label: &str) -> Result<u64, BudgetError> {
        Ok(self
            .tree
            .get(label.as_bytes())
            .map_err(|e| BudgetError::Store(e.to_string()))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Counts one encryption by `label`, or refuses it.
    pub async fn take(&self, label: &str) -> Result<(), BudgetError> {
        let mut counters = self.counters.lock().await;
        let counter = match counters.get(label) {
            Some(counter) => *counter,
            None => {
                let reserved = self.stored(label)?;
                Counter {
                    used: reserved,
                    reserved,
                }
            }
        };
        if counter.used >= self.limit {
            return Err(BudgetError::Exhausted {
                label: label.into(),
                limit: self.limit,
            });
        }
        let mut next = counter;
        if next.used == next.reserved {
            next.reserved = (next.reserved + self.block).min(self.limit);
            self.tree
                .insert(label.as_bytes(), next.reserved.to_be_bytes())
                .map_err(|e| BudgetError::Store(e.to_string()))?;
            self.db
                .flush_async()
                .await
                .map_err(|e| BudgetError::Store(e.to_string()))?;
        }
        next.used += 1;
        counters.insert(label.into(), next);
        Ok(())
    }

    /// Encryptions `label` has made (or may have made, after a crash).
    pub async fn used(&self, label: &str) -> Result<u64, BudgetError> {
        if let Some(counter) = self.counters.lock().await.get(label) {
            return Ok(counter.used);
        }
        self.stored(label)
    }
}

/// Checks the stored budget (tree `nonce_budget`, threat model F1): each
/// entry is an HSM label of a key version and a count of 8 bytes. A count
/// changed to another 8 bytes cannot be told from a true one; the registry
/// check does not cover it either.
pub fn check_stored(db: &custody_store::Store, findings: &mut crate::findings::Findings) {
    crate::findings::each_record(db, "nonce_budget", findings, |label, count, findings| {
        let is_label = std::str::from_utf8(label).is_ok_and(|l| {
            l.rsplit_once("/v")
                .is_some_and(|(_, n)| n.parse::<u32>().is_ok())
        });
        if !is_label {
            findings.add(
                "nonce_budget",
                label,
                "expected the HSM label of a key version (…/v{n}) as the key",
            );
        }
        if count.len() != 8 {
            findings.add(
                "nonce_budget",
                label,
                format!(
                    "expected a count of 8 bytes (big-endian), found {} bytes",
                    count.len()
                ),
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_refuses_past_its_limit_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        let budget = NonceBudget::open(&db, 3).unwrap();
        for _ in 0..3 {
            budget.take("key/a/v1").await.unwrap();
        }
        assert!(matches!(
            budget.take("key/a/v1").await,
            Err(BudgetError::Exhausted { .. })
        ));
        budget.take("key/a/v2").await.unwrap();
        drop(budget);
        let reopened = NonceBudget::open(&db, 3).unwrap();
        assert_eq!(reopened.used("key/a/v1").await.unwrap(), 3);
        assert!(reopened.take("key/a/v1").await.is_err());
        // v2 reserved one block (of 1) and used it: nothing is given back.
        assert_eq!(reopened.used("key/a/v2").await.unwrap(), 1);
    }
}
