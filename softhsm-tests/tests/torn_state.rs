//! Torn state at start (threat model F1, F2, F3), on SoftHSM2 through the
//! real server: records of every sled tree flipped, truncated, deleted or
//! duplicated while custodyd is stopped; custodyd must refuse to start with
//! a report that names the tree and the key, and `custodyd --check` must
//! find the same offline without changing a byte. Then the data directory
//! lost while the token survives: refused, acknowledged, nothing adopted or
//! destroyed, and the keys brought back by the restore ceremony.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use custody_core::findings::show_key;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{
    CeremonyState, CheckDriftRequest, CreateKeyRequest, EncryptRequest, GetKeyRequest,
};
use sha2::Digest as _;
use softhsm_tests::audit_files::{self, open_stopped_db};
use softhsm_tests::ceremony::{Officers, kek_script, restore_script, root_script};
use softhsm_tests::service::{TestService, create_key, runtime};
use softhsm_tests::{TestToken, copy_dir, token_test};

/// How a record is damaged.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Its first byte flipped (a JSON record no longer parses).
    FlipFirst,
    /// One bit flipped in its middle byte.
    FlipMiddle,
    /// A bit of its last byte flipped (a count changed, still well formed).
    FlipLast,
    /// One bit flipped in the last byte of the first `needle` in it: the
    /// record still parses, with one value changed.
    FlipWithin(&'static str),
    /// Cut to half its length.
    Truncate,
    /// Removed.
    Delete,
    /// Copied under another key.
    DuplicateAs(&'static str),
    /// A record written that custodyd did not write (bytes given).
    Insert(&'static str),
}

/// Which record of a tree a case damages.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The record under this key.
    Key(&'static str),
    /// The record of the middle sequence number (the audit log).
    MiddleRecord,
    /// Audit record number `n`.
    Record(u64),
    /// Every record of the tree.
    All,
    /// The first record of the tree, in key order.
    First,
    /// The last record of the tree, in key order.
    Last,
    /// The first record whose value contains this text.
    Containing(&'static str),
}

/// Where the refusal must point.
#[derive(Debug, Clone, Copy)]
enum Named {
    /// The damaged record itself, in its own tree.
    Itself,
    /// The damaged audit record.
    AuditRecord,
    /// Audit record 1 (the log is missing).
    FirstAuditRecord,
    /// The record under `key` in `tree`, which refers to the damaged one.
    Other(&'static str, &'static str),
    /// Some record of `tree` (an index entry whose key is binary).
    SomeOf(&'static str),
}

struct Case {
    tree: &'static str,
    target: Target,
    damage: Damage,
    named: Named,
}

const fn case(tree: &'static str, target: Target, damage: Damage, named: Named) -> Case {
    Case {
        tree,
        target,
        damage,
        named,
    }
}

/// Every tree, and every kind of damage each can show. What the check
/// cannot see is in the threat model (F1): a flip that leaves a valid,
/// self-consistent record in a tree without a hash over it, and a deletion
/// nothing refers to.
#[rustfmt::skip]
const CASES: &[Case] = &[
    case("keys", Target::Key("envelope-kek"), Damage::FlipFirst, Named::Itself),
    case("keys", Target::Key("envelope-kek"), Damage::Truncate, Named::Itself),
    case("keys", Target::Key("envelope-kek"), Damage::Delete, Named::Other("ceremonies", "kek-1")),
    case("keys", Target::Key("envelope-kek"), Damage::DuplicateAs("copy-of-kek"), Named::Other("keys", "copy-of-kek")),
    case("keys", Target::Key("issuer"), Damage::FlipWithin("\"primary_version\":1"), Named::Itself),
    case("keys", Target::Key("issuer"), Damage::FlipWithin("\"public_key_der_hex\":\"30"), Named::Itself),
    case("pending_versions", Target::Key("key/issuer/v1"), Damage::Insert(r#"{"key_id":"issuer","version":1,"hsm_label":"key/issuer/v1","trigger":"create","started_ms":1}"#), Named::Itself),
    case("audit", Target::MiddleRecord, Damage::FlipMiddle, Named::AuditRecord),
    case("audit", Target::MiddleRecord, Damage::Truncate, Named::AuditRecord),
    case("audit", Target::MiddleRecord, Damage::Delete, Named::AuditRecord),
    case("audit", Target::Record(1), Damage::Delete, Named::FirstAuditRecord),
    case("audit", Target::All, Damage::Delete, Named::FirstAuditRecord),
    case("nonce_budget", Target::First, Damage::Truncate, Named::Itself),
    case("meta", Target::Key("pin_failures"), Damage::Truncate, Named::Itself),
    case("clock", Target::Key("high_water_ms"), Damage::Truncate, Named::Itself),
    case("ceremonies", Target::Key("kek-1"), Damage::FlipFirst, Named::Itself),
    case("ceremonies", Target::Key("kek-1"), Damage::Truncate, Named::Itself),
    case("ceremonies", Target::Key("kek-1"), Damage::FlipWithin("\"shares_needed\":0"), Named::Itself),
    case("ceremonies", Target::Key("root-open"), Damage::Delete, Named::Other("ceremonies_unfinished", "root-open")),
    case("ceremonies", Target::Key("kek-1"), Damage::DuplicateAs("kek-2"), Named::Other("ceremonies", "kek-2")),
    case("ceremonies_unfinished", Target::Key("root-open"), Damage::Delete, Named::Itself),
    case("ceremonies_unfinished", Target::Key("root-open"), Damage::DuplicateAs("kek-1"), Named::Other("ceremonies_unfinished", "kek-1")),
    case("backup_keks", Target::Containing("\"ceremony\":\"kek-1\""), Damage::FlipFirst, Named::Itself),
    case("backup_keks", Target::Last, Damage::FlipWithin("\"threshold\":2"), Named::Itself),
    case("backup_keks", Target::Last, Damage::Delete, Named::Other("backup_keks", "current")),
    case("officers", Target::Key("carol"), Damage::FlipFirst, Named::Itself),
    case("officers", Target::Key("carol"), Damage::Truncate, Named::Itself),
    case("officers", Target::Key("carol"), Damage::FlipWithin("\"principal\":\"carol"), Named::Itself),
    case("dual_control", Target::Key("admin_required"), Damage::Truncate, Named::Itself),
    case("dual_control", Target::Key("admin_required"), Damage::FlipLast, Named::Itself),
    case("operations", Target::Containing("\"state\":\"succeeded\""), Damage::FlipFirst, Named::Itself),
    case("operations", Target::Containing("\"state\":\"pending\""), Damage::FlipWithin("\"requester\":\"alice"), Named::Itself),
    case("operations", Target::Containing("\"state\":\"succeeded\""), Damage::Delete, Named::SomeOf("operations_by_time")),
    case("operations_pending", Target::First, Damage::Delete, Named::SomeOf("operations_pending")),
    case("operations_by_time", Target::First, Damage::Delete, Named::SomeOf("operations_by_time")),
    case("operations_by_requester", Target::First, Damage::Truncate, Named::SomeOf("operations_by_requester")),
    case("operations_finished", Target::First, Damage::Delete, Named::SomeOf("operations_finished")),
];

/// Every file of `dir` with its bytes' SHA-256.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path, hex::encode(sha2::Sha256::digest(&bytes)));
            }
        }
    }
    files
}

/// Applies `case` to the stopped daemon's database in `data_dir` (its
/// audit segment log for tree `audit`); returns the tree and the key (as
/// the report shows it) the refusal must name.
fn damage(data_dir: &Path, case: &Case) -> (String, String) {
    if case.tree == "audit" {
        return damage_audit(data_dir, case);
    }
    let db = open_stopped_db(data_dir);
    let tree = db.open_tree(case.tree).unwrap();
    let pick = |target: Target| -> Vec<u8> {
        match target {
            Target::Key(key) => key.as_bytes().to_vec(),
            Target::Record(n) => n.to_be_bytes().to_vec(),
            Target::MiddleRecord => {
                let last = tree.last().unwrap().unwrap().0;
                let last = u64::from_be_bytes(last.as_ref().try_into().unwrap());
                (last / 2).to_be_bytes().to_vec()
            }
            Target::First | Target::All => tree.first().unwrap().unwrap().0.to_vec(),
            Target::Last => tree.last().unwrap().unwrap().0.to_vec(),
            Target::Containing(text) => tree
                .iter()
                .map(Result::unwrap)
                .find(|(_, v)| String::from_utf8_lossy(v).contains(text))
                .unwrap_or_else(|| panic!("no record of {} contains {text}", case.tree))
                .0
                .to_vec(),
        }
    };
    let key = pick(case.target);
    let value = tree.get(&key).unwrap().map(|v| v.to_vec());
    let needs_value = !matches!(case.damage, Damage::Insert(_) | Damage::Delete);
    assert!(
        value.is_some() || !needs_value,
        "case {} {:?}: no record to damage",
        case.tree,
        case.target
    );
    let value = value.unwrap_or_default();
    match case.damage {
        Damage::FlipFirst => {
            let mut bytes = value;
            bytes[0] ^= 0x01;
            tree.insert(&key, bytes).unwrap();
        }
        Damage::FlipMiddle => {
            let mut bytes = value;
            let at = bytes.len() / 2;
            bytes[at] ^= 0x01;
            tree.insert(&key, bytes).unwrap();
        }
        Damage::FlipLast => {
            let mut bytes = value;
            let at = bytes.len() - 1;
            bytes[at] ^= 0x02;
            tree.insert(&key, bytes).unwrap();
        }
        Damage::FlipWithin(needle) => {
            let mut bytes = value;
            let at = String::from_utf8_lossy(&bytes)
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} not in the record"))
                + needle.len()
                - 1;
            bytes[at] ^= 0x01;
            tree.insert(&key, bytes).unwrap();
        }
        Damage::Truncate => {
            tree.insert(&key, &value[..value.len() / 2]).unwrap();
        }
        Damage::Delete if matches!(case.target, Target::All) => tree.clear().unwrap(),
        Damage::Delete => {
            tree.remove(&key).unwrap();
        }
        Damage::DuplicateAs(other) => {
            tree.insert(other.as_bytes(), value).unwrap();
        }
        Damage::Insert(bytes) => {
            tree.insert(&key, bytes.as_bytes()).unwrap();
        }
    }
    db.flush().unwrap();
    let audit = |n: u64| format!("record {n} (0x{})", hex::encode(n.to_be_bytes()));
    match case.named {
        Named::Itself => (case.tree.into(), show_key(&key)),
        Named::AuditRecord => {
            let n = u64::from_be_bytes(key.as_slice().try_into().unwrap());
            ("audit".into(), audit(n))
        }
        Named::FirstAuditRecord => ("audit".into(), audit(1)),
        Named::Other(tree, key) => (tree.into(), show_key(key.as_bytes())),
        Named::SomeOf(tree) => (tree.into(), String::new()),
    }
}

/// [`damage`] for the audit log, whose records lie in segment files: read,
/// changed as the case says, and written back with frames whose CRCs match
/// (what an attacker who knows the format writes), so that what is left to
/// catch it is the chain.
fn damage_audit(data_dir: &Path, case: &Case) -> (String, String) {
    let mut records: BTreeMap<u64, Vec<u8>> = audit_files::read(data_dir).into_iter().collect();
    let last = *records.keys().last().unwrap();
    let seq = match case.target {
        Target::MiddleRecord => last / 2,
        Target::Record(n) => n,
        Target::All => 1,
        other => panic!("no audit case targets {other:?}"),
    };
    let value = records.get_mut(&seq).unwrap();
    match case.damage {
        Damage::FlipMiddle => {
            let at = value.len() / 2;
            value[at] ^= 0x01;
        }
        Damage::Truncate => value.truncate(value.len() / 2),
        Damage::Delete if matches!(case.target, Target::All) => records.clear(),
        Damage::Delete => {
            records.remove(&seq);
        }
        other => panic!("no audit case damages by {other:?}"),
    }
    let records: Vec<(u64, Vec<u8>)> = records.into_iter().collect();
    audit_files::write(data_dir, &records);
    let n = match case.named {
        Named::AuditRecord => seq,
        _ => 1,
    };
    (
        "audit".into(),
        format!("record {n} (0x{})", hex::encode(n.to_be_bytes())),
    )
}

/// Keeps a copy of the stopped daemon's `data_dir` as it is now (as
/// `name` in the token's scratch directory); the returned closure puts the
/// copy back in its place.
fn keep_copy(token: &TestToken, data_dir: &Path, name: &str) -> impl Fn() + use<> {
    let copy = token.scratch().join(name);
    copy_dir(data_dir, &copy);
    let data_dir = data_dir.to_path_buf();
    move || {
        std::fs::remove_dir_all(&data_dir).unwrap();
        copy_dir(&copy, &data_dir);
    }
}

/// A config file for `custodyd --check` on `data_dir`, with an HSM module
/// that does not exist: the check must not need one.
fn check_config(dir: &Path, data_dir: &Path, token: &TestToken) -> PathBuf {
    let path = dir.join("check.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"{}\"\n[hsm]\nmodule = \"/nonexistent/libpkcs11.so\"\n\
             token_label = \"none\"\npin_file = \"{}\"\n[tls]\ncert = \"/nonexistent\"\n\
             key = \"/nonexistent\"\nclient_ca = \"/nonexistent\"\n",
            data_dir.display(),
            token.pin_file().display()
        ),
    )
    .unwrap();
    path
}

fn run_check(config: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_custodyd-under-test"))
        .arg("--check")
        .arg(config)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// A service with a record in every tree: a failed login counted and
/// cleared (`meta`), officers (genesis), a KEK ceremony with its backup KEK
/// activated (`ceremonies`, `backup_keks`, `operations` and their indexes),
/// a ceremony left open (`ceremonies_unfinished`), a pending operation, a
/// signing key, and one encryption (`nonce_budget`).
async fn service_with_every_tree(token: &TestToken) -> TestService {
    let wrong_pin = token.scratch().join("wrong-pin");
    std::fs::write(&wrong_pin, "not the PIN").unwrap();
    let refused = TestService::try_start_with(token, |c| c.hsm.pin_file = Some(wrong_pin)).await;
    assert!(refused.is_err(), "a wrong PIN is refused");
    let service = TestService::start(token).await;
    let officers = Officers::new(&service.officers, service.officer_channels().await);
    officers
        .run_backup_kek(&kek_script("kek-1", "envelope-kek", false))
        .await
        .unwrap();
    let open = root_script("root-open", "root-open-key", false);
    officers.start("alice", &open, "").await.unwrap();
    let operator = service.client("operator").await;
    create_key(&operator, "issuer", "EC_SIGN_P256_SHA256", None).await;
    officers.request_backup("alice").await.unwrap();
    EnvelopeServiceClient::new(service.client("ca-issuing").await)
        .encrypt(EncryptRequest {
            name: "keys/envelope-kek".into(),
            plaintext: b"counted".to_vec(),
            associated_data: Vec::new(),
        })
        .await
        .unwrap();
    service
}

token_test!(
    fn every_tree_torn_is_refused_at_start_and_by_the_offline_check_naming_tree_and_key(token) {
        runtime().block_on(async {
            let mut service = service_with_every_tree(token).await;
            service.stop().await;
            let data_dir = service.config.data_dir.clone();
            let restore = keep_copy(token, &data_dir, "pristine");
            let config = check_config(&token.scratch(), &data_dir, token);
            let (code, report) = run_check(&config);
            assert_eq!(code, 0, "a whole directory checks clean: {report}");
            assert!(report.contains("clean"), "{report}");

            for case in CASES {
                restore();
                let (tree, key) = damage(&data_dir, case);
                let named = format!("tree `{tree}`, key {key}");
                let what = format!("{} {:?} {:?}", case.tree, case.target, case.damage);
                // Offline first: it must not change a byte of the directory.
                let before = snapshot(&data_dir);
                let (code, report) = run_check(&config);
                assert_eq!(code, 1, "{what}: --check exits 1: {report}");
                assert!(report.contains(&named), "{what}: --check names {named}: {report}");
                assert_eq!(snapshot(&data_dir), before, "{what}: --check changed the directory");
                let refusal = service.try_restart().await.err();
                let refusal = refusal.unwrap_or_else(|| panic!("{what}: custodyd started"));
                assert!(refusal.contains(&named), "{what}: the refusal names {named}: {refusal}");
                assert!(refusal.contains("repairs nothing"), "{refusal}");
            }

            // The whole directory again: it starts, and its audit chain is
            // the one it had (the refusals appended nothing).
            restore();
            service.try_restart().await.unwrap();
            let report = service.state().audit.verify();
            assert_eq!(report.first_bad, None);
        });
    }
);

/// The labels of every object on the token (a key pair's label twice).
async fn token_labels(token: &TestToken) -> Vec<String> {
    let hsm = token.open();
    let mut labels: Vec<String> = hsm
        .run(|s| s.inventory())
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.label)
        .collect();
    labels.sort();
    labels
}

token_test!(
    fn a_lost_data_directory_is_refused_then_neither_adopted_nor_destroyed_and_a_restore_brings_the_keys_back(token) {
        runtime().block_on(async {
            // Before: a backup KEK, a backup-exportable key that signs, and
            // the latest backup bundle of both.
            let mut service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let (_, shares) = officers
                .run_backup_kek(&kek_script("kek-1", "envelope-kek", false))
                .await
                .unwrap();
            KeyServiceClient::new(service.client("operator").await)
                .create_key(CreateKeyRequest {
                    key_id: "issuer".into(),
                    algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
                    purpose: custody_proto::v1::KeyPurpose::AsymmetricSign as i32,
                    allowed_signers: vec!["ca-issuing".into()],
                    backup_exportable: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            let pem = service.state().registry.get("issuer").unwrap().versions[0]
                .public_key_pem
                .clone();
            let bundle = officers.approved_backup("alice", &["bob", "carol"]).await.unwrap();
            drop(officers);
            service.stop().await;
            let before = token_labels(token).await;
            let ours = before.iter().filter(|l| custody_core::names::is_custody_label(l)).count();
            assert!(before.iter().any(|l| l == "key/issuer/v1"), "{before:?}");

            // The data directory is lost; the token survives.
            std::fs::remove_dir_all(&service.config.data_dir).unwrap();
            let refusal = service.try_restart().await.unwrap_err();
            for needed in [
                format!("holds {ours} custody objects"),
                "key/issuer/v1".to_string(),
                "custody-audit/v1".to_string(),
                "lost_directory_acknowledged".to_string(),
                "Data directory lost".to_string(),
            ] {
                assert!(refusal.contains(&needed), "the refusal says {needed}: {refusal}");
            }
            assert_eq!(token_labels(token).await, before, "the refusal touched the token");
            // Refused again at the next try: the refusal recorded no state
            // that would let a second start through.
            assert!(service.try_restart().await.is_err());

            // Acknowledged: it starts, adopts nothing and destroys nothing.
            service.config.audit.lost_directory_acknowledged = true;
            service.try_restart().await.unwrap();
            let events = service.audit_events_since(0);
            assert_eq!(events[0]["type"], "started_over_lost_directory", "{events:?}");
            assert_eq!(events[0]["objects"], ours);
            assert!(events[0]["labels"].as_array().unwrap().iter().any(|l| l == "key/issuer/v1"));
            assert!(service.state().registry.get("issuer").is_none(), "nothing adopted");
            let operator = service.client("operator").await;
            let err = KeyServiceClient::new(operator.clone())
                .get_key(GetKeyRequest { name: "keys/issuer".into() })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound);
            let drift = KeyServiceClient::new(operator.clone())
                .check_drift(CheckDriftRequest {})
                .await
                .unwrap()
                .into_inner();
            let extra: Vec<&str> = drift.findings.iter().map(|f| f.label.as_str()).collect();
            assert!(extra.contains(&"key/issuer/v1"), "drift reports the objects left: {extra:?}");
            assert!(
                drift.findings.iter().all(|f| f.kind == custody_proto::v1::DriftKind::Extra as i32),
                "{:?}",
                drift.findings
            );

            // The way back: the restore ceremony, with officers and the
            // custodians' shares, from the latest bundle.
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let script = restore_script("restore-1", &bundle, false);
            let name = officers.start("alice", &script, &bundle).await.unwrap().name;
            officers.sign_in("alice", &name, &script).await.unwrap();
            officers.sign_in("bob", &name, &script).await.unwrap();
            officers.submit_share("alice", &name, &shares["alice"]).await.unwrap();
            let done = officers.submit_share("bob", &name, &shares["bob"]).await.unwrap();
            assert_eq!(done.state, CeremonyState::Completed as i32, "{}", done.error);
            assert_eq!(done.restore.unwrap().verified, 2);
            let message = b"signed after the lost directory";
            let signature = softhsm_tests::service::sign_sha256(&service.client("ca-issuing").await, "issuer", message)
                .await
                .unwrap();
            assert!(softhsm_tests::openssl_verifies_pem(
                &token.scratch(),
                &pem,
                hsm_shim::SignAlgorithm::EcdsaP256Sha256,
                hsm_shim::SignInput::Message(message),
                &signature,
            ));
            // Every object of before is still there, beside the restored ones.
            let after = token_labels(token).await;
            for label in &before {
                assert!(after.contains(label), "{label} was destroyed");
            }
        });
    }
);

/// Flips one bit in the middle of audit record `seq`'s entry (its stored
/// hash no longer matches).
fn flip_audit_record(data_dir: &Path, seq: u64) {
    let mut records = audit_files::read(data_dir);
    let (_, value) = records.iter_mut().find(|(s, _)| *s == seq).unwrap();
    let middle = 32 + (value.len() - 32) / 2;
    value[middle] ^= 0x01;
    audit_files::write(data_dir, &records);
}

/// What an attacker with the database but not the HSM can do to the
/// checkpoint record `seq`: sign its head with a key of their own, and
/// link every later record and the stored head again, so that the chain
/// holds together from record 1 to its end.
fn forge_checkpoint_signature(data_dir: &Path, seq: u64) {
    use p256::ecdsa::signature::Signer;
    let mut records = audit_files::read(data_dir);
    let before = &records.iter().find(|(s, _)| *s == seq - 1).unwrap().1;
    let mut prev: [u8; 32] = before[..32].try_into().unwrap();
    let attacker = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap();
    let mut last = seq;
    for (key, value) in records.iter_mut().filter(|(s, _)| *s >= seq) {
        let mut entry: serde_json::Value = serde_json::from_slice(&value[32..]).unwrap();
        entry["prev"] = hex::encode(prev).into();
        if entry["seq"] == seq {
            assert_eq!(entry["event"]["type"], "checkpoint", "{entry}");
            let message = custody_core::audit::checkpoint_message(seq - 1, &prev);
            let signature: p256::ecdsa::Signature = attacker.sign(message.as_bytes());
            entry["event"]["signature"] = hex::encode(signature.to_der().as_bytes()).into();
        }
        let bytes = serde_json::to_vec(&entry).unwrap();
        prev = custody_core::audit::chain_hash(&prev, &bytes);
        *value = [prev.as_slice(), &bytes].concat();
        last = *key;
    }
    audit_files::write(data_dir, &records);
    let db = open_stopped_db(data_dir);
    let head = db.open_tree("audit_head").unwrap();
    head.insert("head", [last.to_be_bytes().as_slice(), &prev].concat())
        .unwrap();
    db.flush().unwrap();
}

token_test!(
    fn the_start_checks_the_audit_chain_from_its_last_signed_checkpoint(token) {
        // Threat model Q1 and Q2: start-up reads the records from the last
        // signed checkpoint on and checks that checkpoint's signature with
        // the token's audit key; `custodyd --check` and VerifyAudit still
        // read the whole chain.
        runtime().block_on(async {
            let mut service = TestService::start_with(token, |c| {
                c.audit.checkpoint_interval_secs = 3600;
            })
            .await;
            let operator = service.client("operator").await;
            create_key(&operator, "before", "EC_SIGN_P256_SHA256", None).await;
            let checkpoint = service.state().audit.checkpoint().await.unwrap();
            create_key(&operator, "after", "EC_SIGN_P256_SHA256", None).await;
            service.stop().await;
            let data_dir = service.config.data_dir.clone();
            let restore = keep_copy(token, &data_dir, "pristine");
            let config = check_config(&token.scratch(), &data_dir, token);
            let named = |seq: u64| format!("tree `audit`, key record {seq} (0x{})", hex::encode(seq.to_be_bytes()));

            // A record before the checkpoint damaged: start-up does not read
            // it and starts; the whole-chain checks find it.
            flip_audit_record(&data_dir, 2);
            service.try_restart().await.unwrap();
            let report = service.state().audit.verify();
            assert_eq!(report.first_bad.as_ref().map(|(seq, _)| *seq), Some(2), "{report:?}");
            service.stop().await;
            let (code, report) = run_check(&config);
            assert_eq!(code, 1, "--check reads the whole chain: {report}");
            assert!(report.contains(&named(2)), "{report}");

            // A record after the checkpoint damaged: refused.
            restore();
            flip_audit_record(&data_dir, checkpoint + 1);
            let refusal = service.try_restart().await.expect_err("custodyd started");
            assert!(refusal.contains(&named(checkpoint + 1)), "{refusal}");

            // The checkpoint signed by another key, everything after it
            // linked again: the chain holds together, the signature does
            // not verify with the token's audit key, and custodyd does not
            // start (nor falls back to an earlier checkpoint).
            restore();
            forge_checkpoint_signature(&data_dir, checkpoint);
            let (code, report) = run_check(&config);
            assert_eq!(code, 0, "the forged tail chains without the key: {report}");
            let refusal = service.try_restart().await.expect_err("custodyd started");
            assert!(refusal.contains(&format!("audit log corrupt at record {checkpoint}")), "{refusal}");
            assert!(refusal.contains("to verify with the token's audit key; it does not"), "{refusal}");

            // The directory as it was starts, and its chain verifies whole.
            restore();
            service.try_restart().await.unwrap();
            let report = service.state().audit.verify();
            assert_eq!(report.first_bad, None);
            assert!(report.checkpoints >= 1, "{report:?}");
        });
    }
);

/// A service that made a key and stopped, and its data directory.
async fn stopped_with_a_key(token: &TestToken) -> (TestService, PathBuf) {
    let mut service = TestService::start(token).await;
    create_key(
        &service.client("operator").await,
        "k",
        "EC_SIGN_P256_SHA256",
        None,
    )
    .await;
    service.stop().await;
    let data_dir = service.config.data_dir.clone();
    (service, data_dir)
}

token_test!(
    fn the_audit_segment_files_a_torn_tail_is_cut_and_every_other_defect_is_refused(token) {
        // Threat model Q5–Q7: the files of the audit segment log as a crash
        // or someone else left them.
        runtime().block_on(async {
            let (mut service, data_dir) = stopped_with_a_key(token).await;
            let restore = keep_copy(token, &data_dir, "pristine");
            let config = check_config(&token.scratch(), &data_dir, token);
            let before = audit_files::read(&data_dir);
            let last_seq = before.last().unwrap().0;
            let last_file = || audit_files::segment_files(&data_dir).pop().unwrap();
            let len = |path: &Path| std::fs::metadata(path).unwrap().len();

            // Half a group commit after the last acknowledged record (what a
            // crash before the sync leaves): the offline check reads past
            // it, the start cuts it, and the log goes on whole.
            let (_, whole) = audit_files::last_file_end(&data_dir);
            assert_eq!(audit_files::tear_tail(&data_dir, 120), last_seq);
            let (code, report) = run_check(&config);
            assert_eq!(code, 0, "a torn tail is no finding: {report}");
            service.try_restart().await.unwrap();
            let report = service.state().audit.verify();
            assert_eq!(report.first_bad, None, "{report:?}");
            assert!(report.last_seq > last_seq, "the log went on: {report:?}");
            // The cut is in the log, once (Q8), before the start's record.
            let events = service.audit_events_since(before.len());
            assert_eq!(events[0]["type"], "audit_tail_cut", "{events:?}");
            assert_eq!(events[0]["after_record"], last_seq);
            assert_eq!(events[0]["bytes"], 120);
            assert_eq!(events[1]["type"], "daemon_started", "{events:?}");
            assert_eq!(events.iter().filter(|e| e["type"] == "audit_tail_cut").count(), 1);
            service.stop().await;
            let after = audit_files::read(&data_dir);
            assert_eq!(&after[..before.len()], &before[..], "every acknowledged record is there");
            assert!(audit_files::last_file_end(&data_dir).1 > whole, "appended after the cut");

            // The last acknowledged record cut short: the head names it, so
            // it is no torn tail. Refused, and nothing is cut.
            restore();
            let file = std::fs::OpenOptions::new().write(true).open(last_file()).unwrap();
            file.set_len(whole - 10).unwrap();
            drop(file);
            let (code, report) = run_check(&config);
            assert_eq!(code, 1, "{report}");
            assert!(report.contains("records were cut from its end"), "{report}");
            let refusal = service.try_restart().await.expect_err("custodyd started");
            assert!(refusal.contains("records were cut from its end"), "{refusal}");
            assert_eq!(len(&last_file()), whole - 10, "the refused start cut nothing");

            // A byte flipped inside the last file, frames after it: its CRC
            // fails and it is not the tail.
            restore();
            let mut bytes = std::fs::read(last_file()).unwrap();
            let at = whole as usize / 2;
            bytes[at] ^= 0x10;
            std::fs::write(last_file(), &bytes).unwrap();
            let (code, report) = run_check(&config);
            assert_eq!(code, 1, "{report}");
            assert!(report.contains("tree `audit`"), "{report}");
            let refusal = service.try_restart().await.expect_err("custodyd started");
            assert!(refusal.contains("tree `audit`"), "{refusal}");
            assert_eq!(std::fs::read(last_file()).unwrap(), bytes, "nothing repaired");

            // A file custodyd did not write, in the log's directory.
            restore();
            std::fs::write(audit_files::segments_dir(&data_dir).join("00000000000000000099.seg.old"), b"x").unwrap();
            let (code, report) = run_check(&config);
            assert_eq!(code, 1, "{report}");
            assert!(service.try_restart().await.is_err(), "custodyd started");

            // The segment log's directory removed: the head in the database
            // names records no home holds. No new log over them.
            restore();
            std::fs::remove_dir_all(audit_files::segments_dir(&data_dir)).unwrap();
            let (code, report) = run_check(&config);
            assert_eq!(code, 1, "{report}");
            let refusal = service.try_restart().await.expect_err("custodyd started");
            assert!(refusal.contains("tree `audit`"), "{refusal}");
            assert!(!audit_files::segments_dir(&data_dir).exists(), "no new log was made");

            // A note of a repair (Q8) someone else wrote, that is none.
            restore();
            let db = open_stopped_db(&data_dir);
            db.open_tree("audit_head").unwrap().insert("repairs", b"[{\"type\":\"moved\"}]").unwrap();
            db.flush().unwrap();
            drop(db);
            let (code, report) = run_check(&config);
            assert_eq!(code, 1, "{report}");
            assert!(report.contains("tree `audit_head`, key \"repairs\""), "{report}");
            let refusal = service.try_restart().await.expect_err("custodyd started");
            assert!(refusal.contains("audit_head"), "{refusal}");

            restore();
            service.try_restart().await.unwrap();
            assert_eq!(service.state().audit.verify().first_bad, None);
        });
    }
);

token_test!(
    fn a_directory_written_before_segments_moves_its_audit_log_once_and_whole(token) {
        // Threat model Q7: the move keeps every record, and two homes that
        // disagree are refused, not chosen between.
        runtime().block_on(async {
            let (mut service, data_dir) = stopped_with_a_key(token).await;
            let before = audit_files::read(&data_dir);
            assert_eq!(audit_files::to_layout_before_segments(&data_dir), before.len());
            let restore_old_layout = keep_copy(token, &data_dir, "old-layout");

            service.try_restart().await.unwrap();
            let report = service.state().audit.verify();
            assert_eq!(report.first_bad, None, "{report:?}");
            assert!(report.last_seq > before.len() as u64, "{report:?}");
            // The move is in the log (Q8), first of the start's records.
            let events = service.audit_events_since(before.len());
            assert_eq!(events[0]["type"], "audit_log_moved", "{events:?}");
            assert_eq!(events[0]["records"], before.len());
            service.stop().await;
            assert_eq!(&audit_files::read(&data_dir)[..before.len()], &before[..]);
            assert_eq!(audit_files::records_in_database(&data_dir), 0, "the tree was cleared");
            // Started again: nothing moves a second time.
            let files = audit_files::segment_files(&data_dir);
            service.try_restart().await.unwrap();
            let moves = service.audit_events_since(0).iter().filter(|e| e["type"] == "audit_log_moved").count();
            assert_eq!(moves, 1, "the move is recorded once");
            service.stop().await;
            assert_eq!(&audit_files::segment_files(&data_dir)[..files.len()], &files[..]);

            // Someone made an empty `audit/` beside the old tree: the two
            // homes disagree, and custodyd does not choose.
            restore_old_layout();
            std::fs::create_dir(audit_files::segments_dir(&data_dir)).unwrap();
            let refusal = service.try_restart().await.expect_err("custodyd started");
            assert!(refusal.contains("does not choose between them"), "{refusal}");
            assert_eq!(audit_files::records_in_database(&data_dir), before.len(), "the tree is kept");
        });
    }
);
