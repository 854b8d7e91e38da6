//! The lifecycle of a key version (NIST SP 800-57 Part 1, section 7): which
//! state changes are allowed and what each state permits.
//!
//! This module owns the rules and nothing else, so that the services, the
//! scheduler and the model-based tests all ask the same two questions:
//! [`transition_allowed`] and [`permits`]. The rules:
//!
//! | from \ to | active | suspended | deactivated | compromised | destroyed |
//! |---|---|---|---|---|---|
//! | pre-activation | yes | | | yes | scheduled |
//! | active | | yes | yes | yes | |
//! | suspended | yes | | yes | yes | |
//! | deactivated | | | | yes | scheduled |
//! | compromised | | | | | scheduled |
//!
//! "Scheduled" means only through a quorum-approved destruction after the
//! cancel window ([`may_schedule_destroy`]); nothing leaves destroyed.

use crate::registry::VersionState;

/// What a request wants to do with a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Use {
    /// Apply protection: sign, encrypt, wrap a new data key.
    Protect,
    /// Process protected data: verify, decrypt, and read a ciphertext to
    /// rewrap it (a rewrap followed by a decryption releases the plaintext,
    /// so it is the same use).
    Process,
    /// Sign a revocation list with a CA key: an active version, as for
    /// protection, but also after its cryptoperiod, since a CA revokes what
    /// it issued until the last of it expires.
    Revoke,
}

/// Whether a version may go from `from` to `to` by a state change request.
/// Destruction is not a state change request: see [`may_schedule_destroy`].
pub fn transition_allowed(from: VersionState, to: VersionState) -> bool {
    use VersionState::*;
    matches!(
        (from, to),
        (PreActivation, Active)
            | (Active, Suspended)
            | (Suspended, Active)
            | (Active | Suspended, Deactivated)
            | (
                PreActivation | Active | Suspended | Deactivated,
                Compromised
            )
    )
}

/// Whether a version in `state` is in use: it signs or decrypts now, or
/// may again without a new version (suspended).
pub fn in_use(state: VersionState) -> bool {
    matches!(state, VersionState::Active | VersionState::Suspended)
}

/// Whether a version in `state` may be scheduled for destruction. Active
/// and suspended versions must be deactivated first: a key still in use is
/// never destroyed by a schedule someone forgot.
pub fn may_schedule_destroy(state: VersionState) -> bool {
    matches!(
        state,
        VersionState::PreActivation | VersionState::Deactivated | VersionState::Compromised
    )
}

/// Whether a version in `state` may be used for `usage`. Cryptoperiods,
/// minimum versions and scheduled destruction are checked by the caller on
/// top of this.
pub fn permits(state: VersionState, usage: Use) -> bool {
    use VersionState::*;
    match usage {
        Use::Protect | Use::Revoke => state == Active,
        Use::Process => matches!(state, Active | Suspended | Deactivated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VersionState::*;

    #[test]
    fn nothing_leaves_destroyed_and_nothing_reaches_pre_activation() {
        for state in VersionState::ALL {
            assert!(!transition_allowed(Destroyed, state));
            assert!(!transition_allowed(state, PreActivation));
            assert!(!transition_allowed(state, Destroyed));
            assert!(!transition_allowed(state, state), "{state:?} to itself");
        }
    }

    #[test]
    fn only_active_versions_protect_and_nothing_uses_destroyed_or_pre_activation() {
        for state in VersionState::ALL {
            assert_eq!(permits(state, Use::Protect), state == Active);
            assert_eq!(permits(state, Use::Revoke), state == Active);
            for usage in [Use::Protect, Use::Process, Use::Revoke] {
                if matches!(state, Destroyed | PreActivation) {
                    assert!(!permits(state, usage), "{state:?} {usage:?}");
                }
            }
        }
        // A compromised version is used for nothing: not even a rewrap,
        // which would launder ciphertexts forged with the leaked key.
        assert!(!permits(Compromised, Use::Process));
    }

    #[test]
    fn versions_in_use_are_never_scheduled_for_destruction() {
        assert!(!may_schedule_destroy(Active));
        assert!(!may_schedule_destroy(Suspended));
        assert!(!may_schedule_destroy(Destroyed));
    }
}
