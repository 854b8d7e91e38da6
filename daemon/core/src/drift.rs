//! Drift detection: what the registry and journal say the HSM should hold,
//! compared with what it does hold.
//!
//! Every registry version that is not destroyed must have its objects (a
//! private and a public key for signing keys, a secret key for AES keys)
//! under its label, sensitive and non-extractable, with `CKA_ID` equal to the
//! label and the public key or key check value the registry recorded. A
//! destroyed version must have none. The audit key must be there. Anything
//! else on the token is extra, except the objects of a generation in flight
//! (a pending version in the journal) and of a destruction that is due.
//! [`compare`] is pure, so it is tested on its own; [`check`] reads the HSM.
//!
//! Replicas of custodyd share the token: another one makes, rolls back and
//! destroys objects while this one lists them. What another process changed
//! between two readings is not drift on its own: [`check`] reports only
//! what two passes over the token, each between two readings of the
//! registry, both find (see `scan`).

use std::collections::BTreeMap;

use hsm_shim::{ObjectClassName, ObjectSummary};

use crate::algorithms::KeyAlgorithm;
use crate::audit::AUDIT_KEY_LABEL;
use crate::names::version_name;
use crate::registry::{KeyRecord, PendingVersion, VersionState};
use crate::{Custody, Error, Reason};

/// What kind of difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Expected, not there.
    Missing,
    /// There, not expected.
    Extra,
    /// There, but not as recorded.
    AttributeMismatch,
}

impl Kind {
    /// Metric label: missing, extra, attribute_mismatch.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::AttributeMismatch => "attribute_mismatch",
        }
    }
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind.
    pub kind: Kind,
    /// The HSM label.
    pub label: String,
    /// The registry version concerned, if any.
    pub version: Option<String>,
    /// The object class.
    pub class: ObjectClassName,
    /// What differs.
    pub detail: String,
}

/// The result of one comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Differences, sorted by label.
    pub findings: Vec<Finding>,
    /// Objects examined.
    pub objects_checked: usize,
    /// Registry versions examined.
    pub versions_checked: usize,
}

struct Expected {
    version: Option<String>,
    class: ObjectClassName,
    public_key_der_hex: Option<String>,
    check_value: Option<String>,
    /// Backup-exportable keys are extractable (wrap-with-trusted only).
    extractable: bool,
}

/// Objects the key registry does not name but ceremonies account for.
#[derive(Debug, Default, Clone)]
pub struct CeremonyObjects {
    /// Labels an unfinished ceremony has journaled: there or not, both right.
    pub in_flight: Vec<String>,
    /// Trusted backup KEKs: must be there, sensitive and non-extractable.
    pub backup_keks: Vec<String>,
}

/// Compares `keys` (and the generations in flight, `pending`) with the
/// token's `objects` at `now_ms`.
pub fn compare(
    keys: &[std::sync::Arc<KeyRecord>],
    pending: &[PendingVersion],
    ceremonies: &CeremonyObjects,
    objects: &[ObjectSummary],
    now_ms: i64,
) -> Report {
    let mut expected: BTreeMap<(String, ObjectClassName), Expected> = BTreeMap::new();
    let mut must_be_gone: BTreeMap<String, String> = BTreeMap::new();
    let mut may_be_there: Vec<String> = pending.iter().map(|p| p.hsm_label.clone()).collect();
    may_be_there.extend(ceremonies.in_flight.iter().cloned());
    let mut versions_checked = 0;
    for key in keys {
        let asymmetric = KeyAlgorithm::from_api_name(&key.algorithm)
            .is_none_or(|a| a.sign_algorithm().is_some());
        for version in &key.versions {
            versions_checked += 1;
            let name = version_name(&key.key_id, version.version);
            if version.state == VersionState::Destroyed {
                must_be_gone.insert(version.hsm_label.clone(), name);
                continue;
            }
            if version.destroy_at_ms.is_some_and(|at| at <= now_ms)
                || version.destroying_since_ms.is_some()
            {
                // Being destroyed right now: either answer is right.
                may_be_there.push(version.hsm_label.clone());
                continue;
            }
            let classes: &[ObjectClassName] = if asymmetric {
                &[ObjectClassName::Private, ObjectClassName::Public]
            } else {
                &[ObjectClassName::Secret]
            };
            for &class in classes {
                expected.insert(
                    (version.hsm_label.clone(), class),
                    Expected {
                        version: Some(name.clone()),
                        class,
                        public_key_der_hex: (class == ObjectClassName::Public)
                            .then(|| version.public_key_der_hex.clone()),
                        check_value: (class == ObjectClassName::Secret
                            && !version.check_value.is_empty())
                        .then(|| version.check_value.to_uppercase()),
                        extractable: key.backup_exportable && class != ObjectClassName::Public,
                    },
                );
            }
        }
    }
    for (label, class) in [AUDIT_KEY_LABEL, crate::readiness::SELF_TEST_KEY_LABEL]
        .into_iter()
        .flat_map(|label| {
            [ObjectClassName::Private, ObjectClassName::Public].map(|class| (label, class))
        })
    {
        expected.insert(
            (label.to_string(), class),
            Expected {
                version: None,
                class,
                public_key_der_hex: None,
                check_value: None,
                extractable: false,
            },
        );
    }
    for label in &ceremonies.backup_keks {
        expected.insert(
            (label.clone(), ObjectClassName::Secret),
            Expected {
                version: None,
                class: ObjectClassName::Secret,
                public_key_der_hex: None,
                check_value: None,
                extractable: false,
            },
        );
    }

    let mut findings = Vec::new();
    let mut seen: BTreeMap<(String, ObjectClassName), usize> = BTreeMap::new();
    for object in objects {
        let key = (object.label.clone(), object.class);
        let Some(want) = expected.get(&key) else {
            if may_be_there.contains(&object.label) {
                continue;
            }
            let (version, detail) = match must_be_gone.get(&object.label) {
                Some(name) => (
                    Some(name.clone()),
                    "the version is destroyed but this object is still on the token".to_string(),
                ),
                None => (None, "not in custody's registry".to_string()),
            };
            findings.push(Finding {
                kind: Kind::Extra,
                label: object.label.clone(),
                version,
                class: object.class,
                detail,
            });
            continue;
        };
        let count = seen.entry(key).or_default();
        *count += 1;
        if *count > 1 {
            findings.push(Finding {
                kind: Kind::Extra,
                label: object.label.clone(),
                version: want.version.clone(),
                class: object.class,
                detail: "a second object of this class under this label".into(),
            });
            continue;
        }
        let mut differences = Vec::new();
        if object.id != object.label {
            differences.push(format!("CKA_ID is {:?}, not the label", object.id));
        }
        if want.class != ObjectClassName::Public {
            if object.sensitive != Some(true) {
                differences.push(format!("CKA_SENSITIVE is {:?}", object.sensitive));
            }
            if object.extractable != Some(want.extractable) {
                differences.push(format!("CKA_EXTRACTABLE is {:?}", object.extractable));
            }
        }
        if let Some(recorded) = &want.public_key_der_hex {
            let actual = object.public_key_der.as_deref().map(hex::encode);
            if actual.as_deref() != Some(recorded.as_str()) {
                differences.push("the public key differs from the registry's".into());
            }
        }
        if let Some(recorded) = &want.check_value {
            let actual = object.check_value.map(|kcv| kcv.to_string());
            if actual.as_deref() != Some(recorded.as_str()) {
                differences.push(format!(
                    "key check value {} differs from the registry's {recorded}",
                    actual.as_deref().unwrap_or("(none)")
                ));
            }
        }
        if !differences.is_empty() {
            findings.push(Finding {
                kind: Kind::AttributeMismatch,
                label: object.label.clone(),
                version: want.version.clone(),
                class: object.class,
                detail: differences.join("; "),
            });
        }
    }
    for ((label, class), want) in &expected {
        if !seen.contains_key(&(label.clone(), *class)) {
            findings.push(Finding {
                kind: Kind::Missing,
                label: label.clone(),
                version: want.version.clone(),
                class: *class,
                detail: format!("no {} object under this label", class.as_str()),
            });
        }
    }
    findings.sort_by(|a, b| (&a.label, a.class, a.kind).cmp(&(&b.label, b.class, b.kind)));
    Report {
        findings,
        objects_checked: objects.len(),
        versions_checked,
    }
}

/// What the registry and journals said at one moment.
struct Snapshot {
    keys: Vec<std::sync::Arc<KeyRecord>>,
    pending: Vec<PendingVersion>,
    ceremonies: CeremonyObjects,
}

impl Snapshot {
    fn take(state: &Custody) -> Result<Snapshot, Error> {
        let pending = state.registry.pending_versions().map_err(|e| {
            tracing::error!(error = %e, "drift: pending versions unreadable");
            Error::new(
                Reason::RegistryUnavailable,
                "the registry's journal cannot be read",
            )
        })?;
        let (in_flight, backup_keks) = state.ceremonies.expected_labels();
        Ok(Snapshot {
            keys: state.registry.list(None, usize::MAX),
            pending,
            ceremonies: CeremonyObjects {
                in_flight,
                backup_keks,
            },
        })
    }

    fn compare(&self, objects: &[ObjectSummary], now_ms: i64) -> Report {
        compare(&self.keys, &self.pending, &self.ceremonies, objects, now_ms)
    }
}

/// The findings of `first` that `second` has too: what differs from the
/// registry as it stood both before and after the token was listed, or
/// what two passes over the token both find.
pub fn in_both(first: Report, second: &Report) -> Report {
    let same =
        |a: &Finding, b: &Finding| (a.kind, &a.label, a.class) == (b.kind, &b.label, b.class);
    Report {
        findings: first
            .findings
            .into_iter()
            .filter(|f| second.findings.iter().any(|g| same(f, g)))
            .collect(),
        objects_checked: second.objects_checked,
        versions_checked: second.versions_checked,
    }
}

/// Runs a drift check against the HSM and exports its result as metrics,
/// after the check running now, if any (one at a time: each lists the
/// whole token).
pub async fn check(state: &Custody) -> Result<Report, Error> {
    let _running = state.limits.drift.start().await;
    scan(state).await
}

/// [`check`], unless one is running now (the scheduler's turn is then
/// skipped): `None`.
pub async fn check_unless_running(state: &Custody) -> Option<Result<Report, Error>> {
    let _running = state.limits.drift.try_start()?;
    Some(scan(state).await)
}

/// The check itself. The registry lock is not held, so keys are created,
/// rotated and destroyed while the token is listed, here or by another
/// replica on the same token: the registry is read before and after the
/// listing, and only what differs from both is reported — an object made or
/// destroyed during the listing is expected by one of them. What still
/// differs is checked once more against a fresh listing and a fresh reading
/// of the registry, and only what both passes find is reported: an object another process made and removed
/// again (a generation it rolled back), or one it was still making when
/// listed, is gone or in order by then. A real difference shows in every
/// reading (or, if it coincides with a change of the same label, at the
/// next check).
async fn scan(state: &Custody) -> Result<Report, Error> {
    let first = one_pass(state, None).await?;
    let report = if first.report.findings.is_empty() {
        first.report
    } else {
        let again = one_pass(state, Some(first.after)).await?;
        in_both(first.report, &again.report)
    };
    crate::metrics::drift(
        &[Kind::Missing, Kind::Extra, Kind::AttributeMismatch].map(|kind| {
            (
                kind.as_str(),
                report.findings.iter().filter(|f| f.kind == kind).count(),
            )
        }),
    );
    Ok(report)
}

/// One listing of the token between two readings of the registry, and
/// what differs from both.
struct Pass {
    report: Report,
    after: Snapshot,
}

/// A listing between two readings: `before` if the caller has a reading
/// from just now, a fresh one otherwise.
async fn one_pass(state: &Custody, before: Option<Snapshot>) -> Result<Pass, Error> {
    let before = match before {
        Some(snapshot) => snapshot,
        None => Snapshot::take(state)?,
    };
    let objects = state.hsm.run(|session| session.inventory()).await?;
    let after = Snapshot::take(state)?;
    let now_ms = state.clock.now_ms();
    let report = in_both(
        before.compare(&objects, now_ms),
        &after.compare(&objects, now_ms),
    );
    Ok(Pass { report, after })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::readiness::SELF_TEST_KEY_LABEL;
    use crate::registry::VersionRecord;

    fn version(n: u32, state: VersionState) -> VersionRecord {
        VersionRecord {
            version: n,
            state,
            created_ms: 0,
            state_ms: 0,
            hsm_label: format!("key/k/v{n}"),
            public_key_der_hex: "3059".into(),
            public_key_pem: String::new(),
            activated_ms: Some(0),
            destroy_at_ms: None,
            legal_hold: None,
            check_value: String::new(),
            certificate_chain_pem: Vec::new(),
            reserved_by: None,
            destroying_since_ms: None,
            destroy_approved_under: None,
        }
    }

    fn key(versions: Vec<VersionRecord>) -> Arc<KeyRecord> {
        Arc::new(KeyRecord {
            key_id: "k".into(),
            algorithm: "EC_SIGN_P256_SHA256".into(),
            allowed_signers: vec![],
            primary_version: 1,
            versions,
            created_ms: 0,
            policies: Default::default(),
            cryptoperiod_ms: None,
            min_version: 0,
            rotation_requests: vec![],
            backup_exportable: false,
            retired_at_version: None,
        })
    }

    fn object(label: &str, class: ObjectClassName) -> ObjectSummary {
        ObjectSummary {
            class,
            label: label.into(),
            id: label.into(),
            sensitive: (class != ObjectClassName::Public).then_some(true),
            extractable: (class != ObjectClassName::Public).then_some(false),
            public_key_der: (class == ObjectClassName::Public).then(|| vec![0x30, 0x59]),
            check_value: None,
        }
    }

    fn healthy() -> Vec<ObjectSummary> {
        vec![
            object(AUDIT_KEY_LABEL, ObjectClassName::Private),
            object(AUDIT_KEY_LABEL, ObjectClassName::Public),
            object(SELF_TEST_KEY_LABEL, ObjectClassName::Private),
            object(SELF_TEST_KEY_LABEL, ObjectClassName::Public),
            object("key/k/v1", ObjectClassName::Private),
            object("key/k/v1", ObjectClassName::Public),
        ]
    }

    #[test]
    fn a_matching_token_has_no_findings() {
        let report = compare(
            &[key(vec![version(1, VersionState::Active)])],
            &[],
            &CeremonyObjects::default(),
            &healthy(),
            0,
        );
        assert_eq!(report.findings, vec![]);
        assert_eq!((report.objects_checked, report.versions_checked), (6, 1));
    }

    #[test]
    fn missing_extra_and_changed_objects_are_each_reported() {
        let keys = [key(vec![version(1, VersionState::Active)])];
        let mut objects = healthy();
        objects.retain(|o| !(o.label == "key/k/v1" && o.class == ObjectClassName::Private));
        objects.push(object("someone-elses", ObjectClassName::Secret));
        let mut changed = object("key/k/v1", ObjectClassName::Public);
        changed.public_key_der = Some(vec![1]);
        objects.retain(|o| !(o.label == "key/k/v1" && o.class == ObjectClassName::Public));
        objects.push(changed);
        let kinds: Vec<Kind> = compare(&keys, &[], &CeremonyObjects::default(), &objects, 0)
            .findings
            .iter()
            .map(|f| f.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![Kind::Missing, Kind::AttributeMismatch, Kind::Extra]
        );
    }

    #[test]
    fn changes_made_while_the_token_was_listed_are_no_drift_but_real_drift_is() {
        let one = [key(vec![version(1, VersionState::Active)])];
        let two = [key(vec![
            version(1, VersionState::Active),
            version(2, VersionState::Active),
        ])];
        let none = CeremonyObjects::default();
        // A rotation committed while the token was listed: the listing has
        // v2, the registry before did not (extra), after did (fine).
        let mut objects = healthy();
        objects.push(object("key/k/v2", ObjectClassName::Private));
        objects.push(object("key/k/v2", ObjectClassName::Public));
        let before = compare(&one, &[], &none, &objects, 0);
        assert_eq!(before.findings.len(), 2, "against the older registry alone");
        let after = compare(&two, &[], &none, &objects, 0);
        assert_eq!(in_both(before, &after).findings, vec![]);
        // The same rotation seen the other way round (listed before v2 was
        // made): missing after, fine before.
        let before = compare(&one, &[], &none, &healthy(), 0);
        let after = compare(&two, &[], &none, &healthy(), 0);
        assert_eq!(after.findings.len(), 2);
        assert_eq!(in_both(before, &after).findings, vec![]);
        // An object removed behind custodyd's back is missing against both.
        let mut objects = healthy();
        objects.retain(|o| !(o.label == "key/k/v1" && o.class == ObjectClassName::Private));
        objects.push(object("someone-elses", ObjectClassName::Secret));
        let before = compare(&one, &[], &none, &objects, 0);
        let after = compare(&one, &[], &none, &objects, 0);
        let kinds: Vec<Kind> = in_both(before, &after)
            .findings
            .iter()
            .map(|f| f.kind)
            .collect();
        assert_eq!(kinds, vec![Kind::Missing, Kind::Extra]);
    }

    #[test]
    fn only_what_a_second_pass_over_the_token_finds_again_is_reported() {
        let keys = [key(vec![version(1, VersionState::Active)])];
        let none = CeremonyObjects::default();
        // First pass: another process's half-made or rolled-back pair is
        // there, a rogue object too, and the registered private key is gone.
        let mut first = healthy();
        first.retain(|o| !(o.label == "key/k/v1" && o.class == ObjectClassName::Private));
        first.push(object("key/other/v9", ObjectClassName::Private));
        first.push(object("key/other/v9", ObjectClassName::Public));
        first.push(object("rogue", ObjectClassName::Secret));
        // Second pass: the other process's objects are gone.
        let mut second = first.clone();
        second.retain(|o| o.label != "key/other/v9");
        let once = compare(&keys, &[], &none, &first, 0);
        assert_eq!(once.findings.len(), 4, "{once:?}");
        let twice = in_both(once, &compare(&keys, &[], &none, &second, 0));
        let found: Vec<(Kind, &str)> = twice
            .findings
            .iter()
            .map(|f| (f.kind, f.label.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![(Kind::Missing, "key/k/v1"), (Kind::Extra, "rogue")]
        );
        assert_eq!(twice.objects_checked, second.len());
    }

    #[test]
    fn an_extractable_private_key_is_a_mismatch() {
        let keys = [key(vec![version(1, VersionState::Active)])];
        let mut objects = healthy();
        objects[2].extractable = Some(true);
        let report = compare(&keys, &[], &CeremonyObjects::default(), &objects, 0);
        assert_eq!(report.findings.len(), 1);
        assert!(report.findings[0].detail.contains("CKA_EXTRACTABLE"));
    }

    #[test]
    fn destroyed_versions_must_be_gone_and_pending_ones_may_be_there() {
        let keys = [key(vec![
            version(1, VersionState::Destroyed),
            version(2, VersionState::Active),
        ])];
        let mut objects = healthy();
        objects.push(object("key/k/v2", ObjectClassName::Private));
        objects.push(object("key/k/v2", ObjectClassName::Public));
        objects.push(object("key/k/v3", ObjectClassName::Private));
        let pending = [PendingVersion {
            key_id: "k".into(),
            version: 3,
            hsm_label: "key/k/v3".into(),
            trigger: "rotate".into(),
            started_ms: 0,
            instance: String::new(),
            abandoned: false,
            generation: String::new(),
        }];
        let report = compare(&keys, &pending, &CeremonyObjects::default(), &objects, 0);
        assert_eq!(report.findings.len(), 2, "{report:?}");
        assert!(
            report
                .findings
                .iter()
                .all(|f| f.kind == Kind::Extra && f.label == "key/k/v1")
        );
    }
}
