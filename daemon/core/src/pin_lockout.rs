//! PIN lockout, counted by custodyd: SoftHSM2 (and some other modules) never
//! lock a PIN, so a guessing attacker who can restart the daemon with PINs of
//! their choice would never be stopped. custodyd counts consecutive failed
//! logins in its database (flushed before it answers), refuses to try again
//! after `max_pin_failures`, and keeps refusing across restarts until an
//! operator with access to the host resets the count.

/// The count, in the keyspace `meta`.
const KEY: &[u8] = b"pin_failures";

fn tree(db: &custody_store::Store) -> Result<custody_store::Keyspace, String> {
    db.keyspace("meta").map_err(|e| format!("database: {e}"))
}

/// Consecutive failed logins so far.
pub fn failures(db: &custody_store::Store) -> Result<u32, String> {
    Ok(tree(db)?
        .get(KEY)
        .map_err(|e| format!("database: {e}"))?
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map_or(0, u32::from_be_bytes))
}

fn store(db: &custody_store::Store, count: u32) -> Result<(), String> {
    tree(db)?
        .insert(KEY, count.to_be_bytes())
        .map_err(|e| format!("database: {e}"))?;
    db.flush()
        .map(drop)
        .map_err(|e| format!("database flush: {e}"))
}

/// Refuses to try the PIN once `max` consecutive logins have failed.
pub fn check(db: &custody_store::Store, max: u32) -> Result<u32, String> {
    let count = failures(db)?;
    if count >= max {
        return Err(format!(
            "the HSM PIN is locked after {count} consecutive failed logins; \
             find out why, then reset with `custodyd --config FILE --reset-pin-lockout`"
        ));
    }
    Ok(count)
}

/// Records a failed login, durably; returns the new count.
pub fn record_failure(db: &custody_store::Store) -> Result<u32, String> {
    let count = failures(db)?.saturating_add(1);
    store(db, count)?;
    Ok(count)
}

/// Clears the count (after a successful login, or by the operator).
pub fn reset(db: &custody_store::Store) -> Result<(), String> {
    if failures(db)? != 0 {
        store(db, 0)?;
    }
    Ok(())
}

/// Checks the tree `meta` (threat model F1): it holds the failed-login
/// count, 4 bytes, and nothing else.
pub fn check_stored(db: &custody_store::Store, findings: &mut crate::findings::Findings) {
    crate::findings::each_record(db, "meta", findings, |key, value, findings| {
        if key != KEY {
            findings.add("meta", key, "expected only the key \"pin_failures\"");
        } else if value.len() != 4 {
            findings.add(
                "meta",
                key,
                format!(
                    "expected a count of 4 bytes (big-endian), found {} bytes",
                    value.len()
                ),
            );
        }
    });
}
