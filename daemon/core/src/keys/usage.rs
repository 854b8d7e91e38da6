//! Whether a version may be used for a purpose now: its state, a scheduled
//! destruction, its cryptoperiod and the key's minimum version. Signing,
//! verification and every envelope operation ask this one function.

use crate::lifecycle::{self, Use};
use crate::names::version_name;
use crate::registry::{KeyRecord, VersionRecord};
use crate::{Error, Reason};

/// Refuses unless `version` of `record` may be used for `usage` at `now_ms`:
/// its state permits it ([`lifecycle::permits`]), it is not scheduled for
/// destruction, a protecting use is within the cryptoperiod, and a processing
/// use is not below the key's minimum version.
pub fn check_usable(
    record: &KeyRecord,
    version: &VersionRecord,
    usage: Use,
    now_ms: i64,
) -> Result<(), Error> {
    let name = version_name(&record.key_id, version.version);
    if !lifecycle::permits(version.state, usage) {
        let (reason, what) = match usage {
            Use::Protect | Use::Revoke => (
                Reason::VersionNotActive,
                "only active versions sign or encrypt",
            ),
            Use::Process => (
                Reason::VersionNotUsable,
                "only active, suspended and deactivated versions verify, decrypt or rewrap",
            ),
        };
        return Err(Error::new(
            reason,
            format!("{name} is {:?}; {what}", version.state),
        ));
    }
    if version.destroying_since_ms.is_some() {
        return Err(Error::new(
            Reason::DestroyScheduled,
            format!("{name} is being destroyed"),
        ));
    }
    if version.destroy_at_ms.is_some() {
        return Err(Error::new(
            Reason::DestroyScheduled,
            format!("{name} is scheduled for destruction; CancelDestroy to use it again"),
        ));
    }
    match usage {
        Use::Protect => {
            if let Some(until) = version.protect_until_ms(record.cryptoperiod_ms)
                && now_ms >= until
            {
                return Err(Error::new(
                    Reason::CryptoperiodEnded,
                    format!("the cryptoperiod of {name} has ended; rotate the key"),
                ));
            }
        }
        // A CA key signs revocation lists past its cryptoperiod.
        Use::Revoke => {}
        Use::Process => {
            if version.version < record.min_version {
                return Err(Error::new(
                    Reason::BelowMinVersion,
                    format!(
                        "{name} is below the minimum version {} of keys/{}",
                        record.min_version, record.key_id
                    ),
                ));
            }
        }
    }
    Ok(())
}
