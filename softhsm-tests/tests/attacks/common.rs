//! What the attacks share: custodyd with a chosen administrative quorum,
//! ceremonies driven officer by officer, a source daemon's backup and the
//! fresh daemon it is restored into, and the attackers' offline tools
//! (Shamir, RFC 5649 and signatures, with openssl as the independent judge).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use custody_core::ceremony::bundle::Bundle;
use custody_core::ceremony::shares::{self, Share};
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    Algorithm, Ceremony, CeremonyState, CheckDriftRequest, CreateKeyRequest, DecryptRequest,
    Digest, EncryptRequest, GetKeyRequest, GetOperationRequest, GetPublicKeyRequest, Key,
    KeyPurpose, KeyVersion, KeyVersionState, ListOfficersRequest, Operation, OperationState,
    RotateKeyRequest, SetKeyVersionStateRequest, SignSpec, digest, operation_spec,
};
use hsm_shim::{SignAlgorithm, SignInput};
use sha2::Digest as _;
use softhsm_tests::TestToken;
use softhsm_tests::ceremony::{Officers, audit_key_sha256, kek_script, restore_script};
use softhsm_tests::service::{OFFICERS, TestService, reason, request_operation};
use tonic::Status;
use tonic::transport::Channel;

/// What the attacks encrypt and sign.
pub(crate) const PAYLOAD: &[u8] = b"payment batch 2026-117";

/// custodyd whose genesis file makes `required` of alice, bob and carol
/// the administrative quorum (the fixture's own is 2).
pub(crate) async fn service_with_quorum(token: &TestToken, required: u32) -> TestService {
    let service = TestService::start_with(token, |config| {
        let genesis = config.dual_control.genesis_file.clone().unwrap();
        let text = std::fs::read_to_string(&genesis).unwrap();
        assert!(text.starts_with("required = 2\n"), "{text}");
        let text = text.replacen("required = 2", &format!("required = {required}"), 1);
        std::fs::write(&genesis, text).unwrap();
    })
    .await;
    assert_eq!(admin_required(&service).await, required);
    service
}

/// The administrative quorum M, as ListOfficers reports it.
pub(crate) async fn admin_required(service: &TestService) -> u32 {
    OperationServiceClient::new(service.client("alice").await)
        .list_officers(ListOfficersRequest {})
        .await
        .unwrap()
        .into_inner()
        .admin_required
}

/// Each officer on their own channel.
pub(crate) async fn officers_of(service: &TestService) -> Officers<'_> {
    let mut channels = BTreeMap::new();
    for officer in OFFICERS {
        channels.insert(officer.to_string(), service.client(officer).await);
    }
    Officers::new(&service.officers, channels)
}

pub(crate) fn state(ceremony: &Ceremony) -> CeremonyState {
    CeremonyState::try_from(ceremony.state).unwrap()
}

/// A ceremony as far as custodyd lets it go: `present[0]` opens it, each of
/// `present` signs in, each of `custodians` collects their share (if the
/// ceremony hands out shares), each of `present` confirms the fingerprint.
pub(crate) async fn run_ceremony(
    officers: &Officers<'_>,
    script: &str,
    present: &[&str],
    custodians: &[&str],
) -> Result<(Ceremony, BTreeMap<String, String>), Status> {
    let name = officers.start(present[0], script, "").await?.name;
    for officer in present {
        officers.sign_in(officer, &name, script).await?;
    }
    let mut shares = BTreeMap::new();
    let signed_in = officers.get(present[0], &name).await?;
    if state(&signed_in) == CeremonyState::AwaitingShareCollection {
        for custodian in custodians {
            let share = officers.collect(custodian, &name).await?;
            shares.insert(custodian.to_string(), share);
        }
    }
    let mut ceremony = officers.get(present[0], &name).await?;
    let fingerprint = ceremony
        .fingerprint
        .as_ref()
        .map(|f| f.value.clone())
        .unwrap_or_default();
    for officer in present {
        ceremony = officers
            .confirm(officer, &name, script, &fingerprint)
            .await?;
    }
    Ok((ceremony, shares))
}

/// How a refused step reads in a test's message.
pub(crate) fn refusal(step: &str, status: &Status) -> String {
    format!(
        "{step} was refused: {} {}",
        reason(status),
        status.message()
    )
}

/// How a ceremony call ended, for a test's message.
pub(crate) fn outcome(result: &Result<Ceremony, Status>) -> String {
    match result {
        Ok(ceremony) if ceremony.error.is_empty() => format!("{:?}", state(ceremony)),
        Ok(ceremony) => format!("{:?}: {}", state(ceremony), ceremony.error),
        Err(status) => refusal("the call", status),
    }
}

/// A key made by `operator` alone, usable by `ca-issuing`.
pub(crate) async fn create_key(
    operator: &Channel,
    key_id: &str,
    algorithm: Algorithm,
    backup_exportable: bool,
) -> Result<Key, Status> {
    let purpose = match algorithm {
        Algorithm::Aes256Gcm => KeyPurpose::EncryptDecrypt,
        _ => KeyPurpose::AsymmetricSign,
    };
    KeyServiceClient::new(operator.clone())
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            algorithm: algorithm as i32,
            purpose: purpose as i32,
            allowed_signers: vec!["ca-issuing".into()],
            backup_exportable,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

pub(crate) async fn get_key(channel: &Channel, key_id: &str) -> Result<Key, Status> {
    KeyServiceClient::new(channel.clone())
        .get_key(GetKeyRequest {
            name: format!("keys/{key_id}"),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The PEM public key of `key_id`'s primary version, as the registry gives it.
pub(crate) async fn public_key_pem(channel: &Channel, key_id: &str) -> Result<String, Status> {
    KeyServiceClient::new(channel.clone())
        .get_public_key(GetPublicKeyRequest {
            name: format!("keys/{key_id}"),
        })
        .await
        .map(|r| r.into_inner().pem)
}

/// A direct change of a version's state.
pub(crate) async fn set_state(
    operator: &Channel,
    name: &str,
    state: KeyVersionState,
    why: &str,
) -> Result<KeyVersion, Status> {
    KeyServiceClient::new(operator.clone())
        .set_key_version_state(SetKeyVersionStateRequest {
            name: name.into(),
            state: state as i32,
            reason: why.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A direct rotation.
pub(crate) async fn rotate(operator: &Channel, key_id: &str) -> Result<Key, Status> {
    KeyServiceClient::new(operator.clone())
        .rotate_key(RotateKeyRequest {
            name: format!("keys/{key_id}"),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A direct call that a quorum policy must refuse: what happened instead,
/// unless it was refused for want of a quorum.
pub(crate) fn unless_quorum_required<T>(what: &str, result: Result<T, Status>) -> Option<String> {
    match result {
        Err(e) if reason(&e) == "QUORUM_REQUIRED" => None,
        Err(e) => Some(refusal(what, &e) + ", but not for want of a quorum"),
        Ok(_) => Some(format!("{what} succeeded without any officer")),
    }
}

pub(crate) use softhsm_tests::service::sign_sha256 as sign;

/// A Sign of SHA-256(`message`) with `key_id` under its SIGN quorum:
/// `signer` requests it, `approvers` approve in turn until it is no longer
/// pending; the signature from the succeeded operation.
pub(crate) async fn approved_sign(
    signer: &Channel,
    officers: &Officers<'_>,
    approvers: &[&str],
    key_id: &str,
    message: &[u8],
) -> Result<Vec<u8>, Status> {
    let spec = operation_spec::Spec::Sign(SignSpec {
        name: format!("keys/{key_id}"),
        digest: Some(Digest {
            digest: Some(digest::Digest::Sha256(
                sha2::Sha256::digest(message).to_vec(),
            )),
        }),
        encoding: 0,
    });
    let mut operation = request_operation(signer, spec).await?;
    for approver in approvers {
        if operation.state != OperationState::Pending as i32 {
            break;
        }
        operation = officers.approve(approver, &operation).await?;
    }
    if operation.state != OperationState::Succeeded as i32 {
        return Err(Status::failed_precondition(format!(
            "the approved sign did not succeed: {}",
            operation.error
        )));
    }
    let read = OperationServiceClient::new(signer.clone())
        .get_operation(GetOperationRequest {
            name: operation.name,
        })
        .await?
        .into_inner();
    read.signature
        .map(|s| s.signature)
        .ok_or_else(|| Status::internal("a succeeded SIGN operation without a signature"))
}

pub(crate) async fn encrypt(
    app: &Channel,
    key_id: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, Status> {
    EnvelopeServiceClient::new(app.clone())
        .encrypt(EncryptRequest {
            name: format!("keys/{key_id}"),
            plaintext: plaintext.to_vec(),
            associated_data: b"attacks".to_vec(),
        })
        .await
        .map(|r| r.into_inner().ciphertext)
}

pub(crate) async fn decrypt(
    app: &Channel,
    key_id: &str,
    ciphertext: &[u8],
) -> Result<Vec<u8>, Status> {
    EnvelopeServiceClient::new(app.clone())
        .decrypt(DecryptRequest {
            name: format!("keys/{key_id}"),
            ciphertext: ciphertext.to_vec(),
            associated_data: b"attacks".to_vec(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

/// Whatever drift detection finds between the registry and the token, one
/// line per finding.
pub(crate) async fn drift(service: &TestService) -> Vec<String> {
    KeyServiceClient::new(service.client("operator").await)
        .check_drift(CheckDriftRequest {})
        .await
        .unwrap()
        .into_inner()
        .findings
        .iter()
        .map(|f| {
            format!(
                "drift finds {} {}: {}",
                f.kind().as_str_name(),
                f.label,
                f.detail
            )
        })
        .collect()
}

/// Whether `signature` over `message` verifies with `pem`, by openssl.
pub(crate) fn verifies(
    token: &TestToken,
    pem: &str,
    algorithm: SignAlgorithm,
    message: &[u8],
    signature: &[u8],
) -> bool {
    softhsm_tests::openssl_verifies_pem(
        &token.scratch(),
        pem,
        algorithm,
        SignInput::Message(message),
        signature,
    )
}

/// `openssl` with `args` and `input` on stdin: its output, or why it failed.
pub(crate) fn openssl(args: &[&str], input: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The secret that custodians' share lines rebuild (plain GF(256) Shamir:
/// anyone holding the threshold of lines can do it, no HSM needed).
pub(crate) fn combine(lines: &[&str]) -> Result<[u8; 32], String> {
    let shares = lines
        .iter()
        .map(|line| Share::parse(line))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let secret = shares::combine(&shares).map_err(|e| e.to_string())?;
    Ok(*secret)
}

/// RFC 5649 (AES key wrap with padding) under `kek`, by openssl.
pub(crate) fn kwp_wrap(kek: &[u8; 32], key: &[u8]) -> Result<Vec<u8>, String> {
    openssl(
        &[
            "enc",
            "-id-aes256-wrap-pad",
            "-K",
            &hex::encode(kek),
            "-iv",
            "A65959A6",
        ],
        key,
    )
}

/// The RFC 5649 unwrap of `wrapped` under `kek`, by openssl.
pub(crate) fn kwp_unwrap(kek: &[u8; 32], wrapped: &[u8]) -> Result<Vec<u8>, String> {
    openssl(
        &[
            "enc",
            "-d",
            "-id-aes256-wrap-pad",
            "-K",
            &hex::encode(kek),
            "-iv",
            "A65959A6",
        ],
        wrapped,
    )
}

/// A signature (DER ECDSA over `hash` of `message`) made with a private key
/// held outside any HSM: PKCS#8, DER.
pub(crate) fn sign_outside(
    token: &TestToken,
    pkcs8_der: &[u8],
    hash: &str,
    message: &[u8],
) -> Result<Vec<u8>, String> {
    let key = tempfile::NamedTempFile::new_in(token.scratch()).unwrap();
    std::fs::write(key.path(), pkcs8_der).unwrap();
    let path = key.path().to_str().unwrap();
    openssl(
        &[
            "dgst",
            &format!("-{hash}"),
            "-sign",
            path,
            "-keyform",
            "DER",
        ],
        message,
    )
}

/// The token a source's backup is restored into.
pub(crate) const DR_TOKEN: &str = "custody-dr";

/// Where a source daemon publishes its audit key's SHA-256 (hex), for the
/// recovery daemon's config to pin: its bundles verify nowhere else.
fn published_audit_key(token: &TestToken) -> std::path::PathBuf {
    token.scratch().join("source-audit-key.sha256")
}

/// What a source daemon leaves for a disaster.
pub(crate) struct Backup {
    /// The bundle of every backup-exportable key.
    pub(crate) bundle: String,
    /// The custodians' shares of its backup KEK (alice's, bob's and carol's; 2
    /// of them rebuild it unless the KEK script says otherwise).
    pub(crate) shares: BTreeMap<String, String>,
    /// Each bundled key as GetKey showed it at backup time.
    pub(crate) keys: BTreeMap<String, Key>,
    /// The primary public key of each bundled key pair, PEM.
    pub(crate) public_keys: BTreeMap<String, String>,
}

/// A source daemon, stopped after its backup: an honest KEK ceremony
/// (`envelope-kek`, backup KEK 2 of 3), then `prepare`, then a backup by
/// alice. Makes the empty DR token first: SoftHSM2 sees only the tokens
/// present when the process loads it.
pub(crate) async fn back_up_a_source(
    token: &TestToken,
    prepare: impl AsyncFnOnce(&TestService),
) -> Backup {
    back_up_a_source_with(token, &kek_script("kek-1", "envelope-kek", false), prepare).await
}

/// [`back_up_a_source`] with the backup KEK made by `kek_script` (a KEK
/// script, generate mode, whose custodians are alice, bob and carol).
pub(crate) async fn back_up_a_source_with(
    token: &TestToken,
    kek_script: &str,
    prepare: impl AsyncFnOnce(&TestService),
) -> Backup {
    back_up_a_source_configured(token, kek_script, |_| {}, prepare).await
}

/// [`back_up_a_source_with`], the source's config adjusted by `adjust`.
pub(crate) async fn back_up_a_source_configured(
    token: &TestToken,
    kek_script: &str,
    adjust: impl FnOnce(&mut custody_core::config::Config),
    prepare: impl AsyncFnOnce(&TestService),
) -> Backup {
    token.add_token(DR_TOKEN);
    let mut source = TestService::start_with(token, adjust).await;
    let backup = {
        let officers = officers_of(&source).await;
        let (_, shares) = officers.run_backup_kek(kek_script).await.unwrap();
        prepare(&source).await;
        let bundle = officers
            .approved_backup("alice", &["bob", "carol"])
            .await
            .unwrap();
        let operator = source.client("operator").await;
        let mut keys = BTreeMap::new();
        let mut public_keys = BTreeMap::new();
        for bundled in Bundle::parse(&bundle).unwrap().manifest.keys {
            let key = get_key(&operator, &bundled.key_id).await.unwrap();
            if bundled.public_key_der.is_some() {
                let pem = public_key_pem(&operator, &bundled.key_id).await.unwrap();
                public_keys.insert(bundled.key_id.clone(), pem);
            }
            keys.insert(bundled.key_id, key);
        }
        Backup {
            bundle,
            shares,
            keys,
            public_keys,
        }
    };
    std::fs::write(published_audit_key(token), audit_key_sha256(&source)).unwrap();
    source.stop().await;
    backup
}

/// A fresh custodyd on the empty DR token, with a data directory of its own
/// and the officers enrolled anew (the same ids, new keys), whose config pins
/// the audit key the source published (if one did).
pub(crate) async fn recovery_daemon(token: &TestToken) -> TestService {
    let data = token.scratch().join("dr-data");
    let pinned = std::fs::read_to_string(published_audit_key(token)).ok();
    TestService::start_with(token, move |config| {
        config.hsm.token_label = DR_TOKEN.into();
        config.data_dir = data;
        config.ceremony.trusted_audit_keys.extend(pinned);
    })
    .await
}

/// The fresh daemon of [`recovery_daemon`] with `backup` restored into it
/// by an honest ceremony ([`open_restore`], then [`submit_shares`]);
/// panics unless the restore completes.
pub(crate) async fn restored_whole(token: &TestToken, backup: &Backup) -> TestService {
    let dr = recovery_daemon(token).await;
    let officers = officers_of(&dr).await;
    let name = open_restore(&officers, "restore-1", &backup.bundle)
        .await
        .unwrap();
    let done = submit_shares(&officers, &name, &backup.shares)
        .await
        .unwrap();
    assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
    dr
}

/// An honest restore of `bundle`, 2 of alice, bob and carol: alice opens
/// it, alice and bob sign in, and it waits for shares. Its name.
pub(crate) async fn open_restore(
    officers: &Officers<'_>,
    id: &str,
    bundle: &str,
) -> Result<String, Status> {
    let script = restore_script(id, bundle, false);
    let name = officers.start("alice", &script, bundle).await?.name;
    officers.sign_in("alice", &name, &script).await?;
    officers.sign_in("bob", &name, &script).await?;
    Ok(name)
}

/// alice and bob hand in their shares to the restore `name`.
pub(crate) async fn submit_shares(
    officers: &Officers<'_>,
    name: &str,
    shares: &BTreeMap<String, String>,
) -> Result<Ceremony, Status> {
    officers
        .submit_share("alice", name, &shares["alice"])
        .await?;
    officers.submit_share("bob", name, &shares["bob"]).await
}

/// alice and bob approve `operation`, which then succeeds.
pub(crate) async fn approved_by_alice_and_bob(service: &TestService, operation: &Operation) {
    service.approve("alice", operation).await.unwrap();
    let done = service.approve("bob", operation).await.unwrap();
    assert_eq!(
        done.state,
        OperationState::Succeeded as i32,
        "{}",
        done.error
    );
}

/// `spec`, requested by the operator and approved by alice and bob; it
/// succeeds.
pub(crate) async fn requested_and_approved(service: &TestService, spec: operation_spec::Spec) {
    let asked = request_operation(&service.client("operator").await, spec)
        .await
        .unwrap();
    approved_by_alice_and_bob(service, &asked).await;
}

/// `key_id` (EC P-256, backup-exportable) with its version 1 deactivated:
/// after a rotation made version 2 primary if `rotated`, else with v1 its
/// primary, so retired.
pub(crate) async fn with_v1_deactivated(operator: &Channel, key_id: &str, rotated: bool) {
    create_key(operator, key_id, Algorithm::EcSignP256Sha256, true)
        .await
        .unwrap();
    if rotated {
        rotate(operator, key_id).await.unwrap();
    }
    let v1 = format!("keys/{key_id}/versions/1");
    set_state(operator, &v1, KeyVersionState::Deactivated, "end of life")
        .await
        .unwrap();
}
