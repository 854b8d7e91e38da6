//! The one place custody decides who may do what: which roles an action
//! needs, who may use a key (its allow-list), which officer a caller acts
//! as, and whether a key's policy puts an action under quorum. Handlers, the
//! quorum executor and the ceremony engine ask here; none decides alone.
//!
//! What a quorum is and how votes count is [`crate::dual_control::quorum`];
//! which quorum governs an operation is [`quorum_for`].

use crate::Custody;
use crate::dual_control::operation::{
    ALWAYS_GATED_KINDS, KEY_POLICY_KINDS, KeyPolicies, Spec, USED_BY_MATERIAL_ALONE,
    policy_kind_applies,
};
use crate::dual_control::quorum::Quorum;
use crate::dual_control::store::OfficerRecord;
use crate::identity::{Principal, Role};
use crate::registry::{KeyRecord, VersionState};
use crate::{Error, Reason};

/// Whether an action runs on the strength of an approved operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// A direct call: refused where a quorum policy applies.
    None,
    /// Executing an operation the quorum approved.
    Quorum,
}

/// What a caller asks to do, as far as roles decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read a key, its versions and public keys; verify a signature. A
    /// caller who is only a signer reads the keys whose allow-list names it
    /// ([`may_read_key`]).
    ReadKeys,
    /// List every key.
    ListKeys,
    /// Create, rotate, change the state or settings of keys.
    ManageKeys,
    /// Make a key safer: cancel a scheduled destruction, place a legal hold.
    ProtectKeys,
    /// Compare the registry with the HSM.
    CheckDrift,
    /// Sign with a key (the key's allow-list decides which).
    Sign,
    /// Encrypt, decrypt, make or rewrap data keys (the allow-list decides which).
    UseEnvelopeKeys,
    /// Read, export or verify the audit log.
    ReadAudit,
    /// Approve or deny an operation.
    Vote,
    /// Ask for an operation that changes keys (rotate, state, settings).
    RequestKeyChange,
    /// Ask for an operation that changes who controls keys (policies,
    /// officers, destruction, legal holds).
    RequestControlChange,
    /// List the enrolled officers.
    ListOfficers,
    /// Read operations: which ones a caller sees is
    /// [`may_read_operation`]'s decision, per operation.
    ReadOperations,
    /// Ask for an operation: what it asks decides the roles (the requested
    /// operation's own action, checked when it is resolved).
    RequestOperation,
    /// Take part in a key ceremony.
    Ceremony,
    /// Read ceremonies and their transcripts.
    ReadCeremonies,
}

impl Action {
    /// The roles of which the caller must hold one; empty: any
    /// authenticated principal (only [`Action::RequestOperation`], whose
    /// requested operation's own action decides).
    pub fn roles(self) -> &'static [Role] {
        match self {
            Action::RequestOperation => &[],
            Action::ReadKeys | Action::ReadOperations => &Role::ALL,
            Action::ListKeys => &[Role::Operator, Role::Auditor, Role::Officer],
            Action::ListOfficers => &[Role::Officer, Role::Auditor],
            Action::ManageKeys | Action::RequestKeyChange => &[Role::Operator],
            Action::ProtectKeys | Action::RequestControlChange => &[Role::Operator, Role::Officer],
            Action::CheckDrift => &[Role::Operator, Role::Auditor],
            Action::Sign | Action::UseEnvelopeKeys => &[Role::Signer],
            Action::ReadAudit => &[Role::Auditor],
            Action::Vote | Action::Ceremony | Action::ReadCeremonies => &[Role::Officer],
        }
    }
}

impl Action {
    /// Whether the action changes nothing but its own audit record: these
    /// are still served while the data directory is short of its reserve
    /// ([`crate::storage`]).
    pub fn only_reads(self) -> bool {
        match self {
            Action::ReadKeys
            | Action::ListKeys
            | Action::CheckDrift
            | Action::ReadAudit
            | Action::ListOfficers
            | Action::ReadOperations
            | Action::ReadCeremonies => true,
            Action::ManageKeys
            | Action::ProtectKeys
            | Action::Sign
            | Action::UseEnvelopeKeys
            | Action::Vote
            | Action::RequestKeyChange
            | Action::RequestControlChange
            | Action::RequestOperation
            | Action::Ceremony => false,
        }
    }
}

/// Refuses unless `principal` holds one of the roles `action` needs.
pub fn authorize(principal: &Principal, action: Action) -> Result<(), Error> {
    let roles = action.roles();
    if roles.is_empty() || roles.iter().any(|role| principal.has(*role)) {
        return Ok(());
    }
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    Err(Error::new(
        Reason::RoleRequired,
        format!(
            "this needs the {} role, which {} does not hold",
            names.join(" or "),
            principal.name
        ),
    ))
}

/// Refuses unless the principal `name` is on the allow-list of `record`.
pub fn allowed_user(record: &KeyRecord, name: &str) -> Result<(), Error> {
    if record.allowed_signers.iter().any(|allowed| allowed == name) {
        Ok(())
    } else {
        Err(Error::new(
            Reason::NotAllowedSigner,
            format!("{name} is not on the allow-list of keys/{}", record.key_id),
        ))
    }
}

/// The officer `officer_id`, if it is enrolled and bound to the caller's
/// certificate principal: an officer acts only under their own identity.
pub fn acting_officer(
    custody: &Custody,
    principal: &Principal,
    officer_id: &str,
) -> Result<OfficerRecord, Error> {
    let officer = custody.dual_control.officer(officer_id).ok_or_else(|| {
        Error::new(
            Reason::OfficerNotEnrolled,
            format!(
                "{} is not an enrolled officer",
                crate::text::echo(officer_id)
            ),
        )
    })?;
    if officer.principal != principal.name {
        return Err(Error::new(
            Reason::OfficerMismatch,
            format!("officer {officer_id} is bound to another certificate principal"),
        ));
    }
    Ok(officer)
}

/// Refuses unless `principal` may read `record` (its versions, public
/// keys, signatures verified with it): operators, officers and auditors
/// read every key; a signer reads the keys whose allow-list names it.
pub fn may_read_key(principal: &Principal, record: &KeyRecord) -> Result<(), Error> {
    authorize(principal, Action::ReadKeys)?;
    if [Role::Operator, Role::Officer, Role::Auditor]
        .iter()
        .any(|role| principal.has(*role))
    {
        return Ok(());
    }
    allowed_user(record, &principal.name)
}

/// Whether `principal` reads every operation (officers and auditors), not
/// only those it asked for.
pub fn reads_all_operations(principal: &Principal) -> bool {
    principal.has(Role::Officer) || principal.has(Role::Auditor)
}

/// Refuses unless `principal` may read an operation `requester` asked for:
/// the requester, officers and auditors.
pub fn may_read_operation(principal: &Principal, requester: &str) -> Result<(), Error> {
    if reads_all_operations(principal) || requester == principal.name {
        Ok(())
    } else {
        Err(Error::new(
            Reason::NotYours,
            "only the requester, officers and auditors read an operation",
        ))
    }
}

/// The officer the caller is: the one enrolled with its certificate
/// principal.
pub fn officer_of(custody: &Custody, principal: &Principal) -> Result<OfficerRecord, Error> {
    custody
        .dual_control
        .officer_for_principal(&principal.name)
        .ok_or_else(|| {
            Error::new(
                Reason::OfficerNotEnrolled,
                "the caller is no enrolled officer",
            )
        })
}

/// Refuses a direct call when the key's policy puts `kind` under quorum.
pub fn quorum_gate(record: &KeyRecord, kind: &str, approved: Approval) -> Result<(), Error> {
    match (record.policies.get(kind), approved) {
        (Some(quorum), Approval::None) => Err(Error::new(
            Reason::QuorumRequired,
            format!(
                "{kind} on keys/{} needs {} officer approvals: request it with OperationService.RequestOperation",
                record.key_id, quorum.required
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether setting `version` of `record` to `target` activates a staged
/// version: one in pre-activation (only staging makes them, and restores
/// bring them back), wherever it stands against the primary. Activating
/// one gives the key a new version that signs, as a rotation does, so it
/// needs the promotion quorum ([`state_change_quorum`]) even when it does
/// not become primary: a rotation past a staged version, or a restore that
/// made it primary because the bundle lacked the old primary, must not
/// make it cheaper to bring into use.
pub fn activates_staged(record: &KeyRecord, version: u32, target: VersionState) -> bool {
    target == VersionState::Active
        && record
            .version(version)
            .is_some_and(|v| v.state == VersionState::PreActivation)
}

/// Whether setting `version` of `record` to `target` promotes a staged
/// version: a pre-activation version newer than the primary (as an
/// intermediate ceremony with `stage = true` makes) becomes active and
/// primary at once, which is a rotation and an activation in one.
pub fn is_promotion(record: &KeyRecord, version: u32, target: VersionState) -> bool {
    activates_staged(record, version, target) && version > record.primary_version
}

/// The quorum a state change of `version` of `record` to `target` needs
/// (`None`: a direct call may make it). A plain change needs the key's
/// SET_STATE policy. Activating a staged version ([`activates_staged`],
/// whether or not it is a promotion, [`is_promotion`]) brings a new version
/// into use, as a rotation does, and activates it: it needs the ROTATE and the
/// SET_STATE policy both, so the one of the two that covers the other
/// ([`Quorum::covers`]); if neither does, no single quorum meets both and
/// it is refused. Never cheaper than the rotation or the activation alone
/// (threat model C13).
pub fn state_change_quorum(
    record: &KeyRecord,
    version: u32,
    target: VersionState,
) -> Result<Option<Quorum>, Error> {
    let set_state = record.policies.get("SET_STATE");
    if !activates_staged(record, version, target) {
        return Ok(set_state.cloned());
    }
    match (record.policies.get("ROTATE"), set_state) {
        (None, None) => Ok(None),
        (Some(one), None) | (None, Some(one)) => Ok(Some(one.clone())),
        (Some(rotate), Some(set)) if rotate.covers(set) => Ok(Some(rotate.clone())),
        (Some(rotate), Some(set)) if set.covers(rotate) => Ok(Some(set.clone())),
        (Some(_), Some(_)) => Err(Error::new(
            Reason::PromotionPoliciesConflict,
            format!(
                "activating staged keys/{} version {version} needs its ROTATE and SET_STATE policies at once, and neither covers the other: align them first",
                record.key_id
            ),
        )),
    }
}

/// Refuses a direct state change ([`Approval::None`]) that
/// [`state_change_quorum`] says needs officers.
pub fn state_change_gate(
    record: &KeyRecord,
    version: u32,
    target: VersionState,
    approved: Approval,
) -> Result<(), Error> {
    match (state_change_quorum(record, version, target)?, approved) {
        (Some(quorum), Approval::None) => Err(Error::new(
            Reason::QuorumRequired,
            format!(
                "{} on keys/{} needs {} officer approvals: request it with OperationService.RequestOperation",
                if activates_staged(record, version, target) {
                    "activating a staged version"
                } else {
                    "SET_STATE"
                },
                record.key_id,
                quorum.required
            ),
        )),
        _ => Ok(()),
    }
}

/// Refuses a ceremony that has `key` act under its `kind` policy (a root
/// signing a certificate or a CRL: SIGN; a staging ceremony making a new
/// version: ROTATE) with a quorum that does not cover that policy
/// ([`Quorum::covers`]: every set of officers that meets the ceremony's
/// quorum, its officers `listed` in the script's order, also meets the
/// policy). Fewer officers than may use the key directly do not get a
/// ceremony to use it. A key without that policy leaves the administrative
/// quorum the ceremony already meets.
pub fn ceremony_quorum_covers(
    key: &KeyRecord,
    kind: &str,
    quorum: &Quorum,
    listed: &[String],
) -> Result<(), Error> {
    let Some(policy) = key.policies.get(kind) else {
        return Ok(());
    };
    if quorum.covers(policy) {
        return Ok(());
    }
    let outsider = quorum.members.iter().find(|m| !policy.members.contains(*m));
    Err(Error::new(
        Reason::BadScript,
        format!(
            "ceremony script: quorum: {}'s {kind} policy needs {} of {}; the ceremony's quorum ({} of {}) must include that many of them, whichever officers sign in{}",
            key.key_id,
            policy.required,
            policy
                .members
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            quorum.required,
            listed.join(", "),
            outsider.map_or_else(String::new, |o| format!(" ({o} is not one)"))
        ),
    ))
}

/// The administrative quorum (officer set changes, and key actions whose
/// key names no policy of their own but which are always gated).
pub fn admin_quorum(custody: &Custody) -> Result<Quorum, Error> {
    custody
        .dual_control
        .admin_quorum()
        .map_err(|e| Error::new(Reason::NoOfficers, e))
}

/// The quorum that governs `spec` now: the key's own policy for its kind,
/// else the administrative quorum for kinds that are always gated; an
/// operation that needs no approval is refused (call the direct RPC).
pub fn quorum_for(custody: &Custody, spec: &Spec) -> Result<Quorum, Error> {
    let Some(key_id) = spec.key_id() else {
        return admin_quorum(custody);
    };
    let key = custody
        .registry
        .get(key_id)
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
    if let Spec::SetState { version, state, .. } = spec {
        let target = VersionState::from_api_name(state)
            .ok_or_else(|| Error::internal(format!("stored state {state:?}")))?;
        return state_change_quorum(&key, *version, target)?.ok_or_else(|| no_policy(key_id, spec));
    }
    if let Spec::SetPolicy { operation, .. } = spec {
        return policy_change_quorum(custody, &key, operation);
    }
    match key.policies.get(spec.kind()) {
        Some(quorum) => Ok(quorum.clone()),
        None if ALWAYS_GATED_KINDS.contains(&spec.kind()) => admin_quorum(custody),
        None => Err(no_policy(key_id, spec)),
    }
}

/// `policies` (a key's own) with `admin`, the administrative quorum,
/// written in for each key kind that is always gated and that they leave
/// to it: every quorum that governs the key, as [`quorum_for`] falls back.
/// A backup carries these (threat model I3), so that a restore brings the
/// key back under the officers who governed it at the source, never under
/// whatever administrative quorum the restoring daemon has.
pub fn governing_policies(policies: &KeyPolicies, admin: &Quorum) -> KeyPolicies {
    let mut governing = policies.clone();
    for kind in ALWAYS_GATED_KINDS
        .iter()
        .filter(|kind| KEY_POLICY_KINDS.contains(kind))
    {
        governing
            .entry((*kind).to_string())
            .or_insert_with(|| admin.clone());
    }
    governing
}

/// The quorum that changes `key`'s `kind` policy: the key's `SET_POLICY`
/// policy, else the administrative quorum, provided it covers the `kind`
/// policy the key carries now ([`Quorum::covers`]), or, for a kind that is
/// always gated and has no policy of the key's own, the administrative
/// quorum that governs it. Otherwise fewer officers than may use (or
/// destroy, or rotate) the key could first loosen, remove or set that
/// policy, then act under it; the change is refused `BAD_POLICY`, when
/// requested and again when it would run, and the key's `SET_POLICY`
/// policy must be made to cover it first.
pub fn policy_change_quorum(
    custody: &Custody,
    key: &KeyRecord,
    kind: &str,
) -> Result<Quorum, Error> {
    let (changes, named) = match key.policies.get("SET_POLICY") {
        Some(quorum) => (quorum.clone(), "its SET_POLICY policy"),
        None => (admin_quorum(custody)?, "the administrative quorum"),
    };
    let (current, whose) = match key.policies.get(kind) {
        Some(own) => (own.clone(), ""),
        None if ALWAYS_GATED_KINDS.contains(&kind) => (
            admin_quorum(custody)?,
            " (the administrative quorum's: it has none of its own)",
        ),
        None => return Ok(changes),
    };
    if changes.covers(&current) {
        return Ok(changes);
    }
    let list = |quorum: &Quorum| {
        quorum
            .members
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(Error::new(
        Reason::BadPolicy,
        format!(
            "keys/{}'s {kind} policy{whose} needs {} of {}; its policies are changed by {named} ({} of {}), which must include that many of them, whichever officers approve: give keys/{} a SET_POLICY policy that covers its {kind} policy first",
            key.key_id,
            current.required,
            list(&current),
            changes.required,
            list(&changes),
            key.key_id
        ),
    ))
}

/// Whether `keys` may be wrapped under a backup KEK that any
/// `custodians.required` of its custodians (`custodians.members`) rebuild
/// (threat model I1): only if those holders cover ([`Quorum::covers`]) the
/// administrative quorum (`admin`, as it stands now) and each key's SIGN
/// or DECRYPT policy, since rebuilding the KEK yields every key wrapped
/// under it. Otherwise fewer of a key's officers than its quorum, or
/// people it does not name, could use it offline; refused
/// `BACKUP_KEK_TOO_WEAK`, naming the policy. Only officers `enrolled` now
/// count as a policy's or as themselves: a custodian removed since still
/// holds a share, as an outsider to every policy.
pub fn backup_kek_covers<'k>(
    admin: &Quorum,
    custodians: &Quorum,
    keys: impl IntoIterator<Item = &'k KeyRecord>,
    enrolled: impl Fn(&str) -> bool,
) -> Result<(), Error> {
    let holders = Quorum {
        members: custodians
            .members
            .iter()
            .map(|custodian| {
                if enrolled(custodian) {
                    custodian.clone()
                } else {
                    format!("{custodian} (no longer an officer)")
                }
            })
            .collect(),
        required: custodians.required,
    };
    let too_weak = |what: String, needs: &Quorum| {
        Error::new(
            Reason::BackupKekTooWeak,
            format!(
                "any {} of the current backup KEK's custodians rebuild it, but {what} needs {}: run a KEK ceremony whose custodians and [shares] threshold cover it (every threshold of them include as many of those officers), and have the administrative quorum activate it",
                holders.text(),
                needs.text()
            ),
        )
    };
    if !holders.covers(admin) {
        return Err(too_weak("the administrative quorum".into(), admin));
    }
    for key in keys {
        // A kind that cannot apply to the key (an AES key's SIGN) protects
        // nothing; an algorithm not known here counts every kind.
        let purpose = crate::algorithms::KeyAlgorithm::from_api_name(&key.algorithm)
            .map(crate::algorithms::KeyAlgorithm::purpose);
        for kind in USED_BY_MATERIAL_ALONE {
            if purpose.is_some_and(|p| !policy_kind_applies(kind, p)) {
                continue;
            }
            let Some(policy) = key.policies.get(kind) else {
                continue;
            };
            let standing = Quorum {
                members: policy
                    .members
                    .iter()
                    .filter(|m| enrolled(m))
                    .cloned()
                    .collect(),
                required: policy.required,
            };
            if !holders.covers(&standing) {
                return Err(too_weak(
                    format!("keys/{}'s {kind} policy", key.key_id),
                    policy,
                ));
            }
        }
    }
    Ok(())
}

fn no_policy(key_id: &str, spec: &Spec) -> Error {
    Error::new(
        Reason::NoPolicy,
        format!(
            "keys/{key_id} has no {} policy: call the direct RPC instead",
            spec.kind()
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn principal(roles: &[Role]) -> Principal {
        Principal {
            name: "p".into(),
            roles: roles.iter().copied().collect::<BTreeSet<_>>(),
        }
    }

    #[test]
    fn the_governing_policies_write_in_the_administrative_quorum_only_where_the_key_leaves_a_kind_to_it()
     {
        let quorum = |members: &[&str], required| {
            Quorum::new(members.iter().map(|m| m.to_string()), required).unwrap()
        };
        let admin = quorum(&["alice", "bob", "carol"], 3);
        let own = KeyPolicies::from([
            ("SIGN".to_string(), quorum(&["alice", "bob"], 2)),
            ("DESTROY_VERSION".to_string(), quorum(&["bob", "carol"], 2)),
        ]);
        let governing = governing_policies(&own, &admin);
        let kinds: Vec<&str> = governing.keys().map(String::as_str).collect();
        assert_eq!(
            kinds,
            [
                "DESTROY_VERSION",
                "RELEASE_LEGAL_HOLD",
                "SET_POLICY",
                "SIGN"
            ]
        );
        assert_eq!(governing["SIGN"], own["SIGN"]);
        assert_eq!(governing["DESTROY_VERSION"], own["DESTROY_VERSION"]);
        assert_eq!(governing["RELEASE_LEGAL_HOLD"], admin);
        assert_eq!(governing["SET_POLICY"], admin);
    }

    #[test]
    fn each_action_needs_one_of_its_roles() {
        let all = [
            Action::ReadKeys,
            Action::ListKeys,
            Action::ManageKeys,
            Action::ProtectKeys,
            Action::CheckDrift,
            Action::Sign,
            Action::UseEnvelopeKeys,
            Action::ReadAudit,
            Action::Vote,
            Action::RequestKeyChange,
            Action::RequestControlChange,
            Action::ListOfficers,
            Action::ReadOperations,
            Action::RequestOperation,
            Action::Ceremony,
            Action::ReadCeremonies,
        ];
        let roles = [Role::Officer, Role::Signer, Role::Auditor, Role::Operator];
        for action in all {
            assert_eq!(
                authorize(&principal(&[]), action).is_ok(),
                action.roles().is_empty(),
                "{action:?} with no role"
            );
            for role in roles {
                let allowed = authorize(&principal(&[role]), action).is_ok();
                assert_eq!(
                    allowed,
                    action.roles().is_empty() || action.roles().contains(&role),
                    "{action:?} as {role}"
                );
                if !allowed {
                    assert_eq!(
                        authorize(&principal(&[role]), action).unwrap_err().reason,
                        Reason::RoleRequired
                    );
                }
            }
        }
        // The rules that matter most, spelled out.
        assert!(authorize(&principal(&[Role::Operator]), Action::Sign).is_err());
        assert!(authorize(&principal(&[Role::Signer]), Action::Vote).is_err());
        assert!(authorize(&principal(&[Role::Officer]), Action::ManageKeys).is_err());
        assert!(authorize(&principal(&[Role::Signer]), Action::ReadAudit).is_err());
        assert!(authorize(&principal(&[Role::Signer]), Action::ListKeys).is_err());
        assert!(authorize(&principal(&[Role::Signer]), Action::ListOfficers).is_err());
        assert!(authorize(&principal(&[Role::Operator]), Action::ListOfficers).is_err());
        // Every action but asking for an operation needs a role.
        assert_eq!(
            all.iter()
                .filter(|a| a.roles().is_empty())
                .collect::<Vec<_>>(),
            [&Action::RequestOperation]
        );
    }

    #[test]
    fn a_signer_reads_only_the_keys_it_may_use() {
        let record = key(&[]);
        let mut signer = principal(&[Role::Signer]);
        signer.name = "ca".into();
        assert!(may_read_key(&signer, &record).is_ok());
        signer.name = "ca-2".into();
        assert_eq!(
            may_read_key(&signer, &record).unwrap_err().reason,
            Reason::NotAllowedSigner
        );
        for role in [Role::Operator, Role::Officer, Role::Auditor] {
            assert!(may_read_key(&principal(&[role]), &record).is_ok(), "{role}");
        }
    }

    fn key(policies: &[(&str, u32)]) -> KeyRecord {
        let mut record: KeyRecord = serde_json::from_value(serde_json::json!({
            "key_id": "k", "algorithm": "EC_SIGN_P256_SHA256", "allowed_signers": ["ca"],
            "primary_version": 1, "created_ms": 0, "versions": []
        }))
        .expect("a minimal key record");
        for (kind, required) in policies {
            record.policies.insert(
                (*kind).into(),
                Quorum::new(["a", "b", "c"].map(String::from), *required).expect("quorum"),
            );
        }
        record
    }

    #[test]
    fn a_policy_gates_direct_calls_only() {
        let gated = key(&[("SIGN", 2)]);
        assert_eq!(
            quorum_gate(&gated, "SIGN", Approval::None)
                .unwrap_err()
                .reason,
            Reason::QuorumRequired
        );
        assert!(quorum_gate(&gated, "SIGN", Approval::Quorum).is_ok());
        assert!(quorum_gate(&gated, "ROTATE", Approval::None).is_ok());
        assert!(quorum_gate(&key(&[]), "SIGN", Approval::None).is_ok());
    }

    /// `key(policies)` with version 1 active (primary) and version 2
    /// pre-activation (staged).
    fn staged(policies: &[(&str, u32)]) -> KeyRecord {
        let mut record = key(policies);
        for (version, state) in [(1, "active"), (2, "pre_activation")] {
            record.versions.push(
                serde_json::from_value(serde_json::json!({
                    "version": version, "state": state, "created_ms": 0, "state_ms": 0,
                    "hsm_label": format!("k-v{version}"), "public_key_der_hex": "",
                    "public_key_pem": ""
                }))
                .expect("a minimal version"),
            );
        }
        record
    }

    fn with(mut record: KeyRecord, kind: &str, members: &[&str], required: u32) -> KeyRecord {
        let quorum = Quorum::new(members.iter().map(|m| m.to_string()), required).expect("quorum");
        record.policies.insert(kind.into(), quorum);
        record
    }

    #[test]
    fn a_promotion_needs_the_rotate_and_the_set_state_policy_both() {
        let active = VersionState::Active;
        // Not a promotion: SET_STATE alone, as before.
        let plain = staged(&[("ROTATE", 3), ("SET_STATE", 2)]);
        assert!(!is_promotion(&plain, 1, VersionState::Suspended));
        assert!(!is_promotion(&plain, 2, VersionState::Compromised));
        assert_eq!(
            state_change_quorum(&plain, 2, VersionState::Compromised)
                .unwrap()
                .unwrap()
                .required,
            2
        );
        // A promotion: the stricter of ROTATE and SET_STATE, whichever it is.
        assert!(is_promotion(&plain, 2, active));
        assert_eq!(
            state_change_quorum(&plain, 2, active)
                .unwrap()
                .unwrap()
                .required,
            3
        );
        let set_stricter = staged(&[("ROTATE", 2), ("SET_STATE", 3)]);
        assert_eq!(
            state_change_quorum(&set_stricter, 2, active)
                .unwrap()
                .unwrap()
                .required,
            3
        );
        // ROTATE alone gates a promotion that SET_STATE would let through.
        let rotate_only = staged(&[("ROTATE", 2)]);
        assert!(
            state_change_quorum(&rotate_only, 1, VersionState::Suspended)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            state_change_gate(&rotate_only, 2, active, Approval::None)
                .unwrap_err()
                .reason,
            Reason::QuorumRequired
        );
        assert!(state_change_gate(&rotate_only, 2, active, Approval::Quorum).is_ok());
        assert!(state_change_gate(&staged(&[]), 2, active, Approval::None).is_ok());
        // Neither covers the other: 2 of {a, b} and 2 of {b, c}.
        let apart = with(
            with(staged(&[]), "ROTATE", &["a", "b"], 2),
            "SET_STATE",
            &["b", "c"],
            2,
        );
        assert_eq!(
            state_change_quorum(&apart, 2, active).unwrap_err().reason,
            Reason::PromotionPoliciesConflict
        );
        // 2 of {a, b, c} may be a and c: it does not cover 2 of {a, b},
        // which covers it; 3 of {a, b, c} always includes a and b.
        let outsider = with(
            with(staged(&[]), "ROTATE", &["a", "b"], 2),
            "SET_STATE",
            &["a", "b", "c"],
            2,
        );
        let needed = state_change_quorum(&outsider, 2, active).unwrap().unwrap();
        assert_eq!(needed.members.len(), 2);
        let all = with(outsider, "SET_STATE", &["a", "b", "c"], 3);
        let needed = state_change_quorum(&all, 2, active).unwrap().unwrap();
        assert_eq!((needed.required, needed.members.len()), (3, 3));
        // An older pre-activation version (passed by a rotation) is no
        // promotion, but activating it still needs the promotion quorum;
        // so does a pre-activation primary (a restore without the old one).
        let mut older = staged(&[("ROTATE", 3), ("SET_STATE", 2)]);
        older.primary_version = 2;
        older.versions[1].state = VersionState::Active;
        older.versions[0].state = VersionState::PreActivation;
        assert!(!is_promotion(&older, 1, active));
        assert!(activates_staged(&older, 1, active));
        assert_eq!(
            state_change_quorum(&older, 1, active)
                .unwrap()
                .unwrap()
                .required,
            3
        );
        let mut restored = staged(&[("ROTATE", 3)]);
        restored.primary_version = 2;
        assert!(!is_promotion(&restored, 2, active));
        assert!(state_change_gate(&restored, 2, active, Approval::None).is_err());
    }

    #[test]
    fn a_backup_kek_s_custodians_cover_every_use_policy_it_would_wrap() {
        let abc = ["a".to_string(), "b".into(), "c".into()];
        let admin = Quorum::new(abc.clone(), 2).unwrap();
        let holders = |members: &[&str], required: u32| {
            Quorum::new(members.iter().map(|m| m.to_string()), required).unwrap()
        };
        let refused = |holders: &Quorum, keys: &[KeyRecord]| {
            backup_kek_covers(&admin, holders, keys, |_| true)
                .map_err(|e| (e.reason, e.message))
                .err()
        };
        let two_of_abc = holders(&["a", "b", "c"], 2);
        let use_policy = |kind: &str, required: u32| key(&[(kind, required)]);
        assert_eq!(refused(&two_of_abc, &[use_policy("SIGN", 2)]), None);
        let (reason, message) = refused(&two_of_abc, &[key(&[]), use_policy("SIGN", 3)]).unwrap();
        assert_eq!(reason, Reason::BackupKekTooWeak);
        assert!(
            message.contains("keys/k's SIGN policy needs 3 of a, b, c"),
            "{message}"
        );
        let kek_decrypting_under = |required: u32| {
            let mut kek = use_policy("DECRYPT", required);
            kek.algorithm = "AES_256_GCM".into();
            kek
        };
        assert!(refused(&two_of_abc, &[kek_decrypting_under(3)]).is_some());
        assert_eq!(
            refused(&holders(&["a", "b", "c"], 3), &[kek_decrypting_under(3)]),
            None
        );
        // Three holders, but d and e are not the policy's: d, e and a
        // would rebuild it with one of its officers.
        let with_outsiders = holders(&["a", "d", "e"], 3);
        assert!(refused(&with_outsiders, &[use_policy("SIGN", 2)]).is_some());
        // A policy officer removed since counts no more: a and c, who is
        // no officer now, would rebuild it with one of SIGN's officers.
        let c_removed =
            backup_kek_covers(&admin, &two_of_abc, &[use_policy("SIGN", 2)], |o| o != "c");
        assert!(c_removed.is_err());
        // A kind that cannot apply to the key binds nothing: an AES key's
        // SIGN policy.
        let mut aes = use_policy("SIGN", 3);
        aes.algorithm = "AES_256_GCM".into();
        assert_eq!(refused(&two_of_abc, &[aes]), None);
        // The material alone neither rotates nor destroys the live key.
        assert_eq!(
            refused(&two_of_abc, &[use_policy("DESTROY_VERSION", 3)]),
            None
        );
        // The administrative quorum as it stands now, though the KEK's
        // ceremony passed the M of its day.
        let admin_three = Quorum::new(abc, 3).unwrap();
        let refused_admin =
            backup_kek_covers(&admin_three, &two_of_abc, &[], |_| true).unwrap_err();
        assert!(
            refused_admin
                .message
                .contains("the administrative quorum needs 3"),
            "{}",
            refused_admin.message
        );
    }

    #[test]
    fn only_listed_principals_use_a_key() {
        // A name that merely contains a listed one is not on the list.
        assert!(allowed_user(&key(&[]), "ca-2").is_err());
        let record = key(&[]);
        assert!(allowed_user(&record, "ca").is_ok());
        assert_eq!(
            allowed_user(&record, "someone-else").unwrap_err().reason,
            Reason::NotAllowedSigner
        );
    }
}
