//! DR drill RTO: a backup of `DRILL_KEYS` (default 1,000) EC P-256 keys and
//! the KEK of a KEK ceremony, restored by a drill into the scratch token
//! from two of three shares, every key unwrapped, its public key imported
//! from the manifest, a challenge signed and verified, and everything
//! destroyed again. Reported as the RTO custodyd measures (K-th share to
//! last key verified), the wall time of the last share's call, and the same
//! HSM work done directly with hsm-shim on one session in the same run.
//!
//! Run: `cargo bench -p softhsm-tests --bench drill`

use std::collections::BTreeMap;
use std::time::Instant;

use custody_core::ceremony::bundle::Bundle;
use custody_core::ceremony::shares::{self, Share};
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{Algorithm, CreateKeyRequest, KeyPurpose};
use hsm_shim::{
    EcdsaEncoding, Exportability, KeyLabel, KeySpec, SecretSlice, SignAlgorithm, SignInput,
};
use softhsm_tests::TestToken;
use softhsm_tests::ceremony::{Officers, kek_script, restore_script};
use softhsm_tests::service::{SCRATCH_TOKEN, TestService, with_scratch_token};

/// The same work as a drill, directly on a scratch-token session.
fn raw_drill(token: &TestToken, bundle: &Bundle, value: &[u8; 32]) -> f64 {
    let mut config = token.config(1);
    config.token = hsm_shim::TokenSelector::Label(SCRATCH_TOKEN.into());
    let hsm = hsm_shim::Hsm::open(config).expect("scratch token");
    let mut session = hsm.session().expect("session");
    let started = Instant::now();
    let kek = KeyLabel::new("raw-kek").expect("label");
    session
        .import_session_unwrap_kek(&kek, &SecretSlice::from(value.to_vec()))
        .expect("session KEK");
    let digest = [7u8; 32];
    let mut labels = Vec::new();
    for key in &bundle.manifest.keys {
        let Some(spki) = &key.public_key_der else {
            continue;
        };
        let label = KeyLabel::new(format!("raw/{}/v{}", key.key_id, key.version)).expect("label");
        let wrapped = hex::decode(&key.wrapped).expect("hex");
        session
            .unwrap_private_key(
                &kek,
                &wrapped,
                &label,
                KeySpec::EcP256,
                Exportability::NonExportable,
            )
            .expect("unwrap");
        session
            .import_public_key(&label, &hex::decode(spki).expect("hex"), KeySpec::EcP256)
            .expect("public key");
        let input = SignInput::Digest(&digest);
        let signature = session
            .sign(
                &label,
                SignAlgorithm::EcdsaP256Sha256,
                input,
                EcdsaEncoding::Der,
            )
            .expect("sign");
        assert!(
            session
                .verify(
                    &label,
                    SignAlgorithm::EcdsaP256Sha256,
                    input,
                    &signature,
                    EcdsaEncoding::Der
                )
                .expect("verify")
        );
        labels.push(label);
    }
    for label in &labels {
        session.destroy(label).expect("destroy");
    }
    started.elapsed().as_secs_f64()
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let keys: usize = std::env::var("DRILL_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let service = TestService::start_with(token, |c| {
            with_scratch_token(token, c);
            // A bundle of 1,000 P-256 keys is about 0.7 MB, past the tests'
            // 256 KiB message limit.
            c.max_message_bytes = 16 << 20;
        })
        .await;
        let mut channels = BTreeMap::new();
        for officer in ["alice", "bob", "carol"] {
            channels.insert(officer.to_string(), service.client(officer).await);
        }
        let officers = Officers::new(&service.officers, channels);
        let (_, shares) = officers
            .run_backup_kek(&kek_script("bench-kek", "bench-kek", false))
            .await
            .expect("KEK ceremony, its backup KEK activated");
        let operator = service.client("operator").await;
        let created = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..8 {
            let mut client = KeyServiceClient::new(operator.clone());
            tasks.push(tokio::spawn(async move {
                for i in (worker..keys).step_by(8) {
                    client
                        .create_key(CreateKeyRequest {
                            key_id: format!("k{i}"),
                            algorithm: Algorithm::EcSignP256Sha256 as i32,
                            purpose: KeyPurpose::AsymmetricSign as i32,
                            backup_exportable: true,
                            ..Default::default()
                        })
                        .await
                        .expect("create key");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let create_secs = created.elapsed().as_secs_f64();
        let backed_up = Instant::now();
        let bundle_text = officers.approved_backup("alice", &["bob", "carol"]).await.expect("backup");
        let backup_secs = backed_up.elapsed().as_secs_f64();

        let script = restore_script("bench-drill", &bundle_text, true);
        let name = officers.start("alice", &script, &bundle_text).await.expect("start").name;
        officers.sign_in("alice", &name, &script).await.expect("sign in");
        officers.sign_in("bob", &name, &script).await.expect("sign in");
        officers.submit_share("alice", &name, &shares["alice"]).await.expect("share");
        let last = Instant::now();
        // A long restore outlives custodyd's 60 s request timeout; it goes
        // on in its own task, so the outcome is read back.
        let _ = officers.submit_share("bob", &name, &shares["bob"]).await;
        let done = loop {
            let ceremony = officers.get("alice", &name).await.expect("status");
            if ceremony.restore.is_some() || !ceremony.error.is_empty() {
                break ceremony;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let wall = last.elapsed().as_secs_f64();
        let report = done.restore.expect("a drill report");
        assert_eq!(report.verified as usize, keys + 1, "{}", done.error);

        let bundle = Bundle::parse(&bundle_text).expect("bundle");
        let parsed: Vec<Share> = ["alice", "bob"]
            .iter()
            .map(|o| Share::parse(&shares[*o]).expect("share"))
            .collect();
        let value = shares::combine(&parsed).expect("combine");
        let raw = raw_drill(token, &bundle, &value);
        let rto = report.rto_ms as f64 / 1000.0;
        println!("DR drill of {} keys ({keys} EC P-256 + the ceremony's AES KEK)", keys + 1);
        println!("  setup: {keys} keys created in {create_secs:.1} s; backup bundle ({} KiB) in {backup_secs:.2} s", bundle_text.len() / 1024);
        println!("  | measure | seconds | keys/s | ratio to raw |");
        println!("  |---|---|---|---|");
        println!("  | raw hsm-shim, one session (unwrap, import public, sign, verify, destroy) | {raw:.2} | {:.0} | 1.00 |", keys as f64 / raw);
        println!("  | drill RTO reported by custodyd | {rto:.2} | {:.0} | {:.2} |", keys as f64 / rto, raw / rto);
        println!("  | K-th share to the outcome read back | {wall:.2} | {:.0} | {:.2} |", keys as f64 / wall, raw / wall);
        println!("  scratch objects destroyed: {}", report.scratch_objects_destroyed);
    });
}

fn main() {
    softhsm_tests::run_bench("drill", bench);
}
