//! The role table of docs/api.md ("| RPC | who may call |"), attacked
//! through the real server: custodyd in-process on a fresh SoftHSM2 token,
//! real gRPC and mTLS, one certificate per caller.
//!
//! Every RPC of every service is called, with a well-formed request, by
//! every caller the table does not allow: each role other than the allowed
//! ones, holders of the right role whom the key's allow-list, the officer
//! binding, the ceremony's quorum or the ownership of an operation excludes,
//! and a certificate with no custody identity. Each refusal must be
//! PERMISSION_DENIED with the documented reason, change nothing (keys, HSM
//! objects, nonce budgets, operations, officers, ceremonies) and leave
//! exactly one audit record naming the method, the caller and the reason.
//! The allowed callers run the same request and must get their exact
//! outcome, so a server that refused everything would fail.
//!
//! One row per RPC (and per kind of `RequestOperation`): its roles as the
//! table gives them, the callers refused although they hold such a role,
//! and the allowed callers with their expected outcome.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use custody_core::ceremonies::{confirmation_message, presence_message};
use custody_core::ceremony::components::{kcv, parse_component};
use custody_core::ceremony::script::script_digest;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::identity::Role;
use custody_core::registry::KeyRecord;
use custody_proto::v1::audit_service_client::AuditServiceClient;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    AbortCeremonyRequest, BackupKekSpec, BackupSpec, CeremonySignature, CheckDriftRequest,
    CollectShareRequest, CreateBackupRequest, CreateKeyRequest, DecryptRequest, DecryptSpec,
    Digest, EncryptRequest, GenerateDataKeyRequest, GetCeremonyRequest, GetKeyRequest,
    GetOperationRequest, GetPublicKeyRequest, GetTranscriptRequest, KeyRef, KeyVersionState,
    ListCeremoniesRequest, ListKeysRequest, ListOfficersRequest, ListOperationsRequest,
    OfficerSpec, Operation, OperationKind, OperationState, ReadAuditRequest, RewrapRequest,
    RotateKeyRequest, SetKeyVersionStateRequest, SetLegalHoldRequest, SetPolicySpec, SetStateSpec,
    SignRequest, SignSpec, StartCeremonyRequest, SubmitSecretRequest, UpdateKeyRequest,
    VerifyAuditRequest, VerifyRequest, VersionRef, VoteRequest, digest, operation_spec,
    sign_request, submit_secret_request, verify_request,
};
use sha2::Digest as _;
use softhsm_tests::ceremony::root_script;
use softhsm_tests::service::{TestService, create_key, reason, request_operation, runtime};
use softhsm_tests::token_test;
use tonic::Status;
use tonic::transport::Channel;

/// Who calls: one certificate each, made by the test's CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    /// An enrolled officer (`alice`).
    Alice,
    /// Another enrolled officer (`bob`).
    Bob,
    /// The officer role, but enrolled as no officer (`mallory`).
    Mallory,
    /// A signer on every key's allow-list, who asked for the fixture's
    /// SIGN operations (`ca-issuing`).
    Signer,
    /// A signer on no allow-list, who asked for nothing (`other-signer`).
    Stranger,
    /// The operator (`operator`).
    Operator,
    /// The auditor (`auditor`).
    Auditor,
    /// A certificate of the right CA with no custody URI at all.
    Nobody,
}
use Who::{Alice, Auditor, Bob, Mallory, Nobody, Operator, Signer, Stranger};

const EVERYONE: [Who; 8] = [
    Alice, Bob, Mallory, Signer, Stranger, Operator, Auditor, Nobody,
];

impl Who {
    fn principal(self) -> &'static str {
        match self {
            Alice => "alice",
            Bob => "bob",
            Mallory => "mallory",
            Signer => "ca-issuing",
            Stranger => "other-signer",
            Operator => "operator",
            Auditor => "auditor",
            Nobody => "nobody",
        }
    }

    fn roles(self) -> &'static [Role] {
        match self {
            Alice | Bob | Mallory => &[Role::Officer],
            Signer | Stranger => &[Role::Signer],
            Operator => &[Role::Operator],
            Auditor => &[Role::Auditor],
            Nobody => &[],
        }
    }

    /// The principal its audit records name (`-`: no custody identity).
    fn audited_as(self) -> &'static str {
        if self == Nobody {
            "-"
        } else {
            self.principal()
        }
    }
}

/// A refusal: the status code and its stable reason.
#[derive(Debug)]
struct Refused {
    code: tonic::Code,
    reason: String,
}

type Outcome = Result<(), Refused>;
type Call = fn(Arc<Fixture>, Channel) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;
/// What an allowed caller gets: success, or the reason of a later check.
type Expect = Result<(), &'static str>;
const OK: Expect = Ok(());

fn refused(status: Status) -> Refused {
    Refused {
        code: status.code(),
        reason: reason(&status),
    }
}

fn unary<T>(result: Result<tonic::Response<T>, Status>) -> Outcome {
    result.map(drop).map_err(refused)
}

fn boxed(
    call: impl Future<Output = Outcome> + Send + 'static,
) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    Box::pin(call)
}

const ANY: &[Role] = &[];
/// Every role: reads need one (a signer's limited to its allow-listed keys).
const READERS: &[Role] = &[Role::Officer, Role::Signer, Role::Auditor, Role::Operator];
const NOT_A_SIGNER: &[Role] = &[Role::Operator, Role::Auditor, Role::Officer];
const OFFICER_OR_AUDITOR: &[Role] = &[Role::Officer, Role::Auditor];
const OPERATOR: &[Role] = &[Role::Operator];
const SIGNER: &[Role] = &[Role::Signer];
const AUDITOR: &[Role] = &[Role::Auditor];
const OFFICER: &[Role] = &[Role::Officer];
const OPERATOR_OR_OFFICER: &[Role] = &[Role::Operator, Role::Officer];
const OPERATOR_OR_AUDITOR: &[Role] = &[Role::Operator, Role::Auditor];

const EVERYONE_OK: &[(Who, Expect)] = &[
    (Alice, OK),
    (Bob, OK),
    (Mallory, OK),
    (Signer, OK),
    (Stranger, OK),
    (Operator, OK),
    (Auditor, OK),
];
const OFFICERS_OK: &[(Who, Expect)] = &[(Alice, OK), (Bob, OK), (Mallory, OK)];
const ALL_BUT_THE_STRANGER_OK: &[(Who, Expect)] = &[
    (Alice, OK),
    (Bob, OK),
    (Mallory, OK),
    (Signer, OK),
    (Operator, OK),
    (Auditor, OK),
];
const NO_SIGNER_OK: &[(Who, Expect)] = &[
    (Alice, OK),
    (Bob, OK),
    (Mallory, OK),
    (Operator, OK),
    (Auditor, OK),
];
const NOT_ON_THE_ALLOW_LIST: &[(Who, &str)] = &[(Stranger, "NOT_ALLOWED_SIGNER")];
/// Bob and Mallory send Alice's own signed request, under her officer id.
const AS_ALICE: &[(Who, &str)] = &[(Bob, "OFFICER_MISMATCH"), (Mallory, "OFFICER_MISMATCH")];

/// One row of the table.
struct Row {
    /// The RPC as docs/api.md names it (and, in parentheses, what varies).
    rpc: &'static str,
    /// The roles the table allows, one of which the caller must hold;
    /// empty: any authenticated principal.
    roles: &'static [Role],
    /// Callers holding such a role whom something else refuses, and why.
    refusing: &'static [(Who, &'static str)],
    /// Allowed callers, in order, and what each gets.
    allowing: &'static [(Who, Expect)],
    /// The request, made over a caller's channel.
    call: Call,
}

/// `row!(rpc, roles, refusing: [..], allowing: [..], call)`, where the call
/// is `|fixture| Client.method(request)` or `|fixture, channel| future`.
macro_rules! row {
    ($rpc:literal, $roles:expr, refusing: $refusing:expr, allowing: $allowing:expr,
     |$f:pat_param| $client:ident.$method:ident($request:expr)) => {
        row!($rpc, $roles, refusing: $refusing, allowing: $allowing,
             |$f, channel| async move { unary($client::new(channel).$method($request).await) })
    };
    ($rpc:literal, $roles:expr, refusing: $refusing:expr, allowing: $allowing:expr,
     |$f:pat_param, $channel:ident| $call:expr) => {
        Row { rpc: $rpc, roles: $roles, refusing: $refusing, allowing: $allowing,
              call: |$f: Arc<Fixture>, $channel: Channel| boxed($call) }
    };
}

impl Row {
    /// The gRPC method, as audit records name it.
    fn method(&self) -> &'static str {
        self.rpc.split(['.', ' ']).nth(1).unwrap()
    }

    fn holds_a_role(&self, who: Who) -> bool {
        who != Nobody
            && (self.roles.is_empty() || who.roles().iter().any(|r| self.roles.contains(r)))
    }

    /// Every caller the table refuses, with the documented reason.
    fn refusals(&self) -> Vec<(Who, &'static str)> {
        let named = self.refusing.iter().map(|(w, _)| *w);
        for who in named.chain(self.allowing.iter().map(|(w, _)| *w)) {
            assert!(
                self.holds_a_role(who),
                "{}: {who:?} lacks the role",
                self.rpc
            );
        }
        EVERYONE
            .into_iter()
            .filter_map(|who| {
                if who == Nobody {
                    Some((who, "NO_CUSTODY_IDENTITY"))
                } else if let Some((_, why)) = self.refusing.iter().find(|(w, _)| *w == who) {
                    Some((who, *why))
                } else {
                    (!self.holds_a_role(who)).then_some((who, "ROLE_REQUIRED"))
                }
            })
            .collect()
    }
}

/// What the rows' requests refer to, made before the attacks.
struct Fixture {
    /// `ca-issuing`'s signature of [`TBS`] with `keys/k`.
    signature: Vec<u8>,
    /// `ca-issuing`'s ciphertext under `keys/aes`.
    ciphertext: Vec<u8>,
    /// `ca-issuing`'s ciphertext under `keys/aes-gated` (DECRYPT under 2 of 3).
    gated_ciphertext: Vec<u8>,
    /// A SIGN operation on `keys/gated` that `ca-issuing` asked for.
    pending: Operation,
    /// Alice's approval of `pending`, her denial of a second such
    /// operation, and her approval of a ROTATE she asked for herself.
    approve: VoteRequest,
    deny: VoteRequest,
    own: VoteRequest,
    /// Alice's sign-in to `ceremonies/c1`, and a confirmation.
    sign_in: CeremonySignature,
    confirm: CeremonySignature,
    /// The public key of an officer to be (`dave`).
    dave: Vec<u8>,
}

const TBS: &[u8] = b"tbsCertificate";
const AAD: &[u8] = b"tenant=7";

fn sha256(data: &[u8]) -> Digest {
    Digest {
        digest: Some(digest::Digest::Sha256(sha2::Sha256::digest(data).to_vec())),
    }
}

fn sign_k() -> SignRequest {
    SignRequest {
        name: "keys/k".into(),
        input: Some(sign_request::Input::Digest(sha256(TBS))),
        ..Default::default()
    }
}

fn new_key(key_id: &str, backup_exportable: bool) -> CreateKeyRequest {
    CreateKeyRequest {
        key_id: key_id.into(),
        algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
        purpose: custody_proto::v1::KeyPurpose::AsymmetricSign as i32,
        allowed_signers: vec!["ca-issuing".into()],
        backup_exportable,
        ..Default::default()
    }
}

fn version(name: &str) -> VersionRef {
    VersionRef { name: name.into() }
}

fn set_state(name: &str, state: KeyVersionState) -> SetKeyVersionStateRequest {
    SetKeyVersionStateRequest {
        name: name.into(),
        state: state as i32,
        reason: String::new(),
    }
}

fn sign_gated() -> operation_spec::Spec {
    operation_spec::Spec::Sign(SignSpec {
        name: "keys/gated".into(),
        digest: Some(sha256(TBS)),
        encoding: 0,
    })
}

async fn ask(channel: Channel, spec: operation_spec::Spec) -> Outcome {
    unary(
        request_operation(&channel, spec)
            .await
            .map(tonic::Response::new),
    )
}

/// A well-formed key component from `officer`, with its check value.
fn component(name: &str, officer: &str) -> SubmitSecretRequest {
    let component = "11".repeat(32);
    SubmitSecretRequest {
        name: name.into(),
        officer_id: officer.into(),
        expected_kcv: hex::encode(kcv(&parse_component(&component).unwrap())),
        secret: Some(submit_secret_request::Secret::ComponentHex(component)),
    }
}

/// One SignStream call of one request; a refused item is its refusal.
async fn sign_stream(channel: Channel) -> Outcome {
    let mut responses = SigningServiceClient::new(channel)
        .sign_stream(futures_util::stream::iter(vec![sign_k()]))
        .await
        .map_err(refused)?
        .into_inner();
    let item = responses.message().await.unwrap().unwrap();
    match item.error {
        Some(error) => {
            assert!(
                item.signature.is_empty(),
                "a refused item carries a signature"
            );
            let code = tonic::Code::from(error.code);
            Err(Refused {
                code,
                reason: error.reason,
            })
        }
        None if item.signature.is_empty() => panic!("an item with neither signature nor error"),
        None => Ok(()),
    }
}

fn rows() -> Vec<Row> {
    use operation_spec::Spec;
    vec![
        // KeyService
        row!("KeyService.CreateKey", OPERATOR, refusing: &[], allowing: &[(Operator, OK), (Operator, Err("KEY_EXISTS"))],
             |_| KeyServiceClient.create_key(new_key("fresh", false))),
        row!("KeyService.CreateKey (backup_exportable)", OPERATOR, refusing: &[], allowing: &[(Operator, OK)],
             |_| KeyServiceClient.create_key(new_key("fresh-backup", true))),
        // Reads need a role; a signer reads the keys on whose allow-list it is.
        row!("KeyService.GetKey", READERS, refusing: NOT_ON_THE_ALLOW_LIST, allowing: ALL_BUT_THE_STRANGER_OK,
             |_| KeyServiceClient.get_key(GetKeyRequest { name: "keys/k".into() })),
        row!("KeyService.ListKeys", NOT_A_SIGNER, refusing: &[], allowing: NO_SIGNER_OK,
             |_| KeyServiceClient.list_keys(ListKeysRequest::default())),
        row!("KeyService.GetPublicKey", READERS, refusing: NOT_ON_THE_ALLOW_LIST, allowing: ALL_BUT_THE_STRANGER_OK,
             |_| KeyServiceClient.get_public_key(GetPublicKeyRequest { name: "keys/k".into() })),
        row!("KeyService.RotateKey", OPERATOR, refusing: &[], allowing: &[(Operator, OK)],
             |_| KeyServiceClient.rotate_key(RotateKeyRequest {
                 name: "keys/managed".into(), request_id: String::new() })),
        row!("KeyService.SetKeyVersionState", OPERATOR, refusing: &[], allowing: &[(Operator, OK)],
             |_| KeyServiceClient.set_key_version_state(
                 set_state("keys/managed/versions/1", KeyVersionState::Suspended))),
        // UpdateKey, CancelDestroy, SetLegalHold, CheckDrift: docs/api.md, Lifecycle.
        row!("KeyService.UpdateKey", OPERATOR, refusing: &[], allowing: &[(Operator, OK)],
             |_| KeyServiceClient.update_key(UpdateKeyRequest {
                 name: "keys/managed".into(), cryptoperiod: None, min_version: Some(1) })),
        row!("KeyService.CancelDestroy", OPERATOR_OR_OFFICER, refusing: &[],
             allowing: &[(Alice, OK), (Operator, Err("NOT_SCHEDULED"))],
             |_| KeyServiceClient.cancel_destroy(version("keys/doomed/versions/1"))),
        row!("KeyService.SetLegalHold", OPERATOR_OR_OFFICER, refusing: &[], allowing: &[(Operator, OK), (Alice, OK)],
             |_| KeyServiceClient.set_legal_hold(SetLegalHoldRequest {
                 name: "keys/managed/versions/1".into(), reason: "case 42".into() })),
        row!("KeyService.CheckDrift", OPERATOR_OR_AUDITOR, refusing: &[], allowing: &[(Operator, OK), (Auditor, OK)],
             |_| KeyServiceClient.check_drift(CheckDriftRequest {})),
        // SigningService
        row!("SigningService.Sign", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST, allowing: &[(Signer, OK)],
             |_| SigningServiceClient.sign(sign_k())),
        row!("SigningService.SignStream", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST, allowing: &[(Signer, OK)],
             |_, channel| sign_stream(channel)),
        row!("SigningService.Verify", READERS, refusing: NOT_ON_THE_ALLOW_LIST, allowing: ALL_BUT_THE_STRANGER_OK,
             |f| SigningServiceClient.verify(VerifyRequest {
                 name: "keys/k".into(), input: Some(verify_request::Input::Digest(sha256(TBS))),
                 signature: f.signature.clone(), encoding: 0 })),
        // EnvelopeService (docs/api.md, Envelope encryption): signers on the key's allow-list.
        row!("EnvelopeService.Encrypt", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST, allowing: &[(Signer, OK)],
             |_| EnvelopeServiceClient.encrypt(EncryptRequest {
                 name: "keys/aes".into(), plaintext: b"pay".to_vec(), associated_data: AAD.to_vec() })),
        row!("EnvelopeService.Decrypt", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST, allowing: &[(Signer, OK)],
             |f| EnvelopeServiceClient.decrypt(DecryptRequest {
                 name: "keys/aes".into(), ciphertext: f.ciphertext.clone(), associated_data: AAD.to_vec() })),
        row!("EnvelopeService.GenerateDataKey", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST, allowing: &[(Signer, OK)],
             |_| EnvelopeServiceClient.generate_data_key(GenerateDataKeyRequest {
                 name: "keys/aes".into(), associated_data: AAD.to_vec() })),
        row!("EnvelopeService.Rewrap", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST, allowing: &[(Signer, OK)],
             |f| EnvelopeServiceClient.rewrap(RewrapRequest {
                 name: "keys/aes".into(), ciphertext: f.ciphertext.clone(), associated_data: AAD.to_vec() })),
        // AuditService
        row!("AuditService.ReadAudit", AUDITOR, refusing: &[], allowing: &[(Auditor, OK)],
             |_| AuditServiceClient.read_audit(ReadAuditRequest { start_seq: 0 })),
        row!("AuditService.VerifyAudit", AUDITOR, refusing: &[], allowing: &[(Auditor, OK)],
             |_| AuditServiceClient.verify_audit(VerifyAuditRequest {})),
        // RequestOperation, one row per kind; DESTROY_VERSION and
        // RELEASE_LEGAL_HOLD as in docs/api.md, Lifecycle.
        row!("OperationService.RequestOperation (SIGN)", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST,
             allowing: &[(Signer, OK)],
             |_, channel| ask(channel, sign_gated())),
        row!("OperationService.RequestOperation (ROTATE)", OPERATOR, refusing: &[], allowing: &[(Operator, OK)],
             |_, channel| ask(channel, Spec::Rotate(KeyRef { name: "keys/gated".into() }))),
        row!("OperationService.RequestOperation (SET_STATE)", OPERATOR, refusing: &[], allowing: &[(Operator, OK)],
             |_, channel| ask(channel, Spec::SetState(SetStateSpec {
                 name: "keys/gated/versions/1".into(), state: KeyVersionState::Suspended as i32, reason: String::new() }))),
        row!("OperationService.RequestOperation (UPDATE_KEY)", OPERATOR, refusing: &[], allowing: &[(Operator, OK)],
             |_, channel| ask(channel, Spec::UpdateKey(UpdateKeyRequest {
                 name: "keys/gated".into(), cryptoperiod: None, min_version: Some(1) }))),
        row!("OperationService.RequestOperation (SET_POLICY)", OPERATOR_OR_OFFICER, refusing: &[],
             allowing: &[(Operator, OK), (Alice, OK), (Mallory, OK)],
             |_, channel| ask(channel, Spec::SetPolicy(SetPolicySpec {
                 name: "keys/k".into(), operation: OperationKind::Sign as i32,
                 officers: vec!["alice".into(), "bob".into()], required: 2 }))),
        row!("OperationService.RequestOperation (ADD_OFFICER)", OPERATOR_OR_OFFICER, refusing: &[],
             allowing: &[(Operator, OK), (Bob, OK)],
             |f, channel| ask(channel, Spec::AddOfficer(OfficerSpec {
                 officer_id: "dave".into(), principal: "dave".into(), public_key: f.dave.clone() }))),
        // Past the decision, the domain refuses: the fixture's open ceremonies
        // register keys under policies naming carol (I5).
        row!("OperationService.RequestOperation (REMOVE_OFFICER)", OPERATOR_OR_OFFICER, refusing: &[],
             allowing: &[(Operator, Err("OFFICER_REMOVAL_REFUSED")), (Alice, Err("OFFICER_REMOVAL_REFUSED"))],
             |_, channel| ask(channel, Spec::RemoveOfficer(OfficerSpec { officer_id: "carol".into(), ..Default::default() }))),
        row!("OperationService.RequestOperation (DESTROY_VERSION)", OPERATOR_OR_OFFICER, refusing: &[],
             allowing: &[(Operator, OK), (Alice, OK)],
             |_, channel| ask(channel, Spec::DestroyVersion(version("keys/old/versions/1")))),
        row!("OperationService.RequestOperation (RELEASE_LEGAL_HOLD)", OPERATOR_OR_OFFICER, refusing: &[],
             allowing: &[(Operator, OK), (Alice, OK)],
             |_, channel| ask(channel, Spec::ReleaseLegalHold(version("keys/held/versions/1")))),
        row!("OperationService.RequestOperation (DECRYPT)", SIGNER, refusing: NOT_ON_THE_ALLOW_LIST,
             allowing: &[(Signer, OK)],
             |f, channel| ask(channel, Spec::Decrypt(DecryptSpec {
                 name: "keys/aes-gated".into(), ciphertext: f.gated_ciphertext.clone(),
                 associated_data: AAD.to_vec(), recipient_public_key: f.dave.clone() }))),
        row!("OperationService.RequestOperation (CREATE_BACKUP)", OFFICER, refusing: &[],
             allowing: &[(Alice, Err("NO_BACKUP_KEK"))],
             |_, channel| ask(channel, Spec::CreateBackup(BackupSpec::default()))),
        row!("OperationService.RequestOperation (ACTIVATE_BACKUP_KEK)", OFFICER, refusing: &[],
             allowing: &[(Alice, Err("NO_BACKUP_KEK"))],
             |_, channel| ask(channel, Spec::ActivateBackupKek(BackupKekSpec { ceremony: "ceremonies/kek-none".into(), ..Default::default() }))),
        // Reading operations: the requester, officers and auditors. ListOperations
        // refuses no one: it lists what the caller may read (checked after the table).
        row!("OperationService.GetOperation", ANY, refusing: &[(Stranger, "NOT_YOURS"), (Operator, "NOT_YOURS")],
             allowing: &[(Signer, OK), (Alice, OK), (Mallory, OK), (Auditor, OK)],
             |f| OperationServiceClient.get_operation(GetOperationRequest { name: f.pending.name.clone() })),
        row!("OperationService.ListOperations", ANY, refusing: &[], allowing: EVERYONE_OK,
             |_| OperationServiceClient.list_operations(ListOperationsRequest::default())),
        // Votes: an officer enrolled under the officer id sent, bound to this
        // certificate's principal, and not the requester.
        row!("OperationService.ApproveOperation", OFFICER, refusing: AS_ALICE, allowing: &[(Alice, OK)],
             |f| OperationServiceClient.approve_operation(f.approve.clone())),
        row!("OperationService.ApproveOperation (own request)", OFFICER,
             refusing: &[(Alice, "REQUESTER_CANNOT_APPROVE"), (Bob, "OFFICER_MISMATCH"), (Mallory, "OFFICER_MISMATCH")],
             allowing: &[],
             |f| OperationServiceClient.approve_operation(f.own.clone())),
        row!("OperationService.DenyOperation", OFFICER, refusing: AS_ALICE, allowing: &[(Alice, OK)],
             |f| OperationServiceClient.deny_operation(f.deny.clone())),
        row!("OperationService.ListOfficers", OFFICER_OR_AUDITOR, refusing: &[],
             allowing: &[(Alice, OK), (Mallory, OK), (Auditor, OK)],
             |_| OperationServiceClient.list_officers(ListOfficersRequest {})),
        // CeremonyService: officers; calls made as an officer only over that
        // officer's certificate; an abort only by an officer of its quorum.
        row!("CeremonyService.StartCeremony", OFFICER, refusing: &[], allowing: &[(Alice, OK), (Bob, Err("CEREMONY_EXISTS"))],
             |_| CeremonyServiceClient.start_ceremony(StartCeremonyRequest {
                 script: root_script("c-new", "c-new-root", false), bundle: String::new(), csr: Vec::new(), certificate: Vec::new() })),
        row!("CeremonyService.GetCeremony", OFFICER, refusing: &[], allowing: OFFICERS_OK,
             |_| CeremonyServiceClient.get_ceremony(GetCeremonyRequest { name: "ceremonies/c1".into() })),
        row!("CeremonyService.ListCeremonies", OFFICER, refusing: &[], allowing: OFFICERS_OK,
             |_| CeremonyServiceClient.list_ceremonies(ListCeremoniesRequest {})),
        row!("CeremonyService.SignIn", OFFICER, refusing: AS_ALICE, allowing: &[(Alice, OK)],
             |f| CeremonyServiceClient.sign_in(f.sign_in.clone())),
        row!("CeremonyService.CollectShare", OFFICER, refusing: AS_ALICE, allowing: &[(Alice, Err("NOT_DISTRIBUTING"))],
             |_| CeremonyServiceClient.collect_share(CollectShareRequest {
                 name: "ceremonies/c1".into(), officer_id: "alice".into() })),
        row!("CeremonyService.SubmitSecret", OFFICER, refusing: AS_ALICE, allowing: &[(Alice, Err("NOT_A_CUSTODIAN"))],
             |_| CeremonyServiceClient.submit_secret(component("ceremonies/c1", "alice"))),
        row!("CeremonyService.Confirm", OFFICER, refusing: AS_ALICE, allowing: &[(Alice, Err("NOT_CONFIRMING"))],
             |f| CeremonyServiceClient.confirm(f.confirm.clone())),
        row!("CeremonyService.AbortCeremony", OFFICER, refusing: &[(Bob, "NOT_IN_QUORUM"), (Mallory, "OFFICER_NOT_ENROLLED")],
             allowing: &[(Alice, OK)],
             |_| CeremonyServiceClient.abort_ceremony(AbortCeremonyRequest {
                 name: "ceremonies/c-abort".into(), reason: "wrong room".into() })),
        row!("CeremonyService.GetTranscript", OFFICER, refusing: &[], allowing: OFFICERS_OK,
             |_| CeremonyServiceClient.get_transcript(GetTranscriptRequest { name: "ceremonies/c1".into() })),
        row!("CeremonyService.CreateBackup", OFFICER, refusing: &[], allowing: &[(Alice, Err("QUORUM_REQUIRED"))],
             |_| CeremonyServiceClient.create_backup(CreateBackupRequest {})),
    ]
}

/// Everything a refused call must leave as it was, part by part.
async fn world(service: &TestService) -> Vec<(&'static str, String)> {
    let state = service.state();
    let keys = state.registry.list(None, usize::MAX);
    let mut budgets = Vec::new();
    for version in keys.iter().flat_map(|k| &k.versions) {
        let used = state.budget.used(&version.hsm_label).await.unwrap();
        budgets.push(format!("{} {used}", version.hsm_label));
    }
    let inventory = state.hsm.run(|session| session.inventory()).await;
    let mut objects: Vec<String> = inventory
        .unwrap()
        .iter()
        .map(|o| format!("{} {} {}", o.class.as_str(), o.label, o.id))
        .collect();
    objects.sort();
    let mut operations = state.dual_control.operations().unwrap();
    operations.sort_by(|a, b| a.id.cmp(&b.id));
    let keys: Vec<&KeyRecord> = keys.iter().map(|k| &**k).collect();
    let json = |value: serde_json::Result<String>| value.unwrap();
    vec![
        ("keys", json(serde_json::to_string(&keys))),
        ("HSM objects", objects.join("\n")),
        ("nonce budgets", budgets.join("\n")),
        ("operations", json(serde_json::to_string(&operations))),
        (
            "officers",
            json(serde_json::to_string(&state.dual_control.officers())),
        ),
        (
            "ceremonies",
            json(serde_json::to_string(
                &state.ceremonies.journal.list().unwrap(),
            )),
        ),
    ]
}

/// Whether `event` records `who`'s call of `method` refused for `why`. A
/// vote is recorded as a vote (with its signature) once the voter is known;
/// each item of a SignStream is recorded as a `Sign`.
fn records_refusal(event: &serde_json::Value, method: &str, who: Who, why: &str) -> bool {
    let names_method = match event["type"].as_str() {
        Some("request") if method == "SignStream" && who != Nobody => event["method"] == "Sign",
        Some("request") => event["method"] == method,
        Some("vote") => matches!(
            (method, event["vote"].as_str()),
            ("ApproveOperation", Some("approve")) | ("DenyOperation", Some("deny"))
        ),
        _ => false,
    };
    names_method && event["principal"] == who.audited_as() && event["outcome"] == why
}

/// The fixture: keys, operations and ceremonies for the rows' requests.
async fn prepare(service: &TestService, channels: &HashMap<Who, Channel>) -> Fixture {
    let (operator, signer) = (&channels[&Operator], &channels[&Signer]);
    for key in ["k", "gated", "managed", "old", "held", "doomed"] {
        create_key(operator, key, "EC_SIGN_P256_SHA256", None).await;
    }
    create_key(operator, "aes", "AES_256_GCM", None).await;
    create_key(operator, "aes-gated", "AES_256_GCM", None).await;
    use OperationKind::{Decrypt, Rotate, SetState, Sign, UpdateKey};
    for kind in [Sign, Rotate, SetState, UpdateKey] {
        service.gate("gated", kind).await;
    }
    service.gate("aes-gated", Decrypt).await;
    // `old` and `doomed`: version 1 deactivated behind a new primary, and
    // `doomed` v1 scheduled for destruction; `held` v1 under a legal hold.
    let mut keys = KeyServiceClient::new(operator.clone());
    for key in ["old", "doomed"] {
        let rotate = RotateKeyRequest {
            name: format!("keys/{key}"),
            request_id: String::new(),
        };
        keys.rotate_key(rotate).await.unwrap();
        let v1 = format!("keys/{key}/versions/1");
        let deactivate = set_state(&v1, KeyVersionState::Deactivated);
        keys.set_key_version_state(deactivate).await.unwrap();
    }
    let doomed = operation_spec::Spec::DestroyVersion(version("keys/doomed/versions/1"));
    let destroy = request_operation(operator, doomed).await.unwrap();
    service.approve("alice", &destroy).await.unwrap();
    let scheduled = service.approve("bob", &destroy).await.unwrap();
    assert_eq!(scheduled.state, OperationState::Succeeded as i32);
    let hold = SetLegalHoldRequest {
        name: "keys/held/versions/1".into(),
        reason: "case 1".into(),
    };
    keys.set_legal_hold(hold).await.unwrap();

    let signed = SigningServiceClient::new(signer.clone())
        .sign(sign_k())
        .await;
    let encrypt = EncryptRequest {
        name: "keys/aes".into(),
        plaintext: b"pay".to_vec(),
        associated_data: AAD.to_vec(),
    };
    let sealed = EnvelopeServiceClient::new(signer.clone())
        .encrypt(encrypt)
        .await;
    // A DECRYPT policy leaves encryption direct.
    let gated = EncryptRequest {
        name: "keys/aes-gated".into(),
        plaintext: b"dek".to_vec(),
        associated_data: AAD.to_vec(),
    };
    let gated = EnvelopeServiceClient::new(signer.clone())
        .encrypt(gated)
        .await;
    let pending = request_operation(signer, sign_gated()).await.unwrap();
    let to_deny = request_operation(signer, sign_gated()).await.unwrap();
    // Alice, operator and officer at once, asks for a rotation that she
    // is an eligible officer of.
    let alice_operator = service.client_as("alice", &[Role::Operator, Role::Officer]);
    let rotate = operation_spec::Spec::Rotate(KeyRef {
        name: "keys/gated".into(),
    });
    let own = request_operation(&alice_operator.await, rotate)
        .await
        .unwrap();
    assert!(own.eligible_officers.iter().any(|o| o == "alice"));

    let c1 = root_script("c1", "c1-root", false);
    let c_abort = root_script("c-abort", "c-abort-root", false);
    // Its quorum: alice and carol, not bob.
    let c_abort = c_abort.replace(r#"["alice", "bob", "carol"]"#, r#"["alice", "carol"]"#);
    let mut ceremonies = CeremonyServiceClient::new(channels[&Alice].clone());
    for script in [c1.clone(), c_abort] {
        let bundle = String::new();
        let start = StartCeremonyRequest {
            script,
            bundle,
            csr: Vec::new(),
            certificate: Vec::new(),
        };
        ceremonies.start_ceremony(start).await.unwrap();
    }
    let digest = script_digest(c1.as_bytes());
    let alice_signs = |message: &[u8]| CeremonySignature {
        name: "ceremonies/c1".into(),
        officer_id: "alice".into(),
        signature: service.officer("alice").sign(message).to_vec(),
    };
    let passphrase = hsm_shim::SecretString::from("a passphrase for dave");
    let (dave, _) = OfficerKey::generate("dave", &passphrase).unwrap();
    Fixture {
        signature: signed.unwrap().into_inner().signature,
        ciphertext: sealed.unwrap().into_inner().ciphertext,
        gated_ciphertext: gated.unwrap().into_inner().ciphertext,
        approve: service.vote_for("alice", &pending, true),
        deny: service.vote_for("alice", &to_deny, false),
        own: service.vote_for("alice", &own, true),
        pending,
        sign_in: alice_signs(&presence_message(&digest)),
        confirm: alice_signs(&confirmation_message(&digest, &[0; 32])),
        dave: dave.public_key().to_vec(),
    }
}

token_test!(
    fn every_rpc_refuses_every_caller_the_role_table_does_not_allow(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let mut channels = HashMap::new();
            for who in EVERYONE {
                channels.insert(who, service.client_as(who.principal(), who.roles()).await);
            }
            let fixture = Arc::new(prepare(&service, &channels).await);
            let (mut refusals, mut allowed, mut failures) = (0, 0, Vec::new());
            let mut by_reason = std::collections::BTreeMap::<&str, usize>::new();
            for row in rows() {
                for (who, why) in row.refusals() {
                    let case = format!("{} as {who:?}", row.rpc);
                    let before = world(&service).await;
                    let records = service.state().audit.records(1).count();
                    match (row.call)(fixture.clone(), channels[&who].clone()).await {
                        Ok(()) => failures.push(format!("{case}: allowed, but the table refuses it ({why})")),
                        Err(refused) if (refused.code, refused.reason.as_str()) != (tonic::Code::PermissionDenied, why) => {
                            failures.push(format!("{case}: {refused:?}, not PERMISSION_DENIED {why}"));
                        }
                        Err(_) => {}
                    }
                    let after = world(&service).await;
                    for ((part, was), (_, is)) in before.iter().zip(&after) {
                        if was != is {
                            failures.push(format!("{case}: the refusal changed the {part}"));
                        }
                    }
                    let events = service.audit_events_since(records);
                    if !(events.len() == 1 && records_refusal(&events[0], row.method(), who, why)) {
                        failures.push(format!("{case}: not exactly one audit record of the refusal: {events:?}"));
                    }
                    refusals += 1;
                    *by_reason.entry(why).or_default() += 1;
                }
                for &(who, expected) in row.allowing {
                    let outcome = (row.call)(fixture.clone(), channels[&who].clone()).await;
                    if outcome.as_ref().copied().map_err(|r| r.reason.as_str()) != expected {
                        failures.push(format!("{} as {who:?}: {outcome:?}, expected {expected:?}", row.rpc));
                    }
                    allowed += 1;
                }
            }
            eprintln!("{refusals} refusals and {allowed} allowed calls over {} rows: {by_reason:?}", rows().len());
            assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));

            // ListOperations lists only what the caller may read: a caller
            // neither officer nor auditor sees its own operations alone.
            let list = |who: Who| {
                let mut client = OperationServiceClient::new(channels[&who].clone());
                async move { client.list_operations(ListOperationsRequest::default()).await.unwrap().into_inner().operations }
            };
            for who in [Stranger, Signer, Operator] {
                let listed = list(who).await;
                let others: Vec<&str> = listed.iter().map(|o| o.requester.as_str()).filter(|r| *r != who.principal()).collect();
                assert!(others.is_empty(), "{who:?} lists operations of {others:?}");
                assert_eq!(listed.is_empty(), who == Stranger, "{who:?} lists its own operations");
            }
            for who in [Auditor, Mallory] {
                assert!(list(who).await.iter().any(|o| o.name == fixture.pending.name), "{who:?} lists every operation");
            }
        });
    }
);

/// An RPC added to `proto/custody/v1` without a row here fails this test.
#[test]
fn every_rpc_of_the_protos_has_a_row() {
    let protos = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/custody/v1");
    let rows = rows();
    let (mut rpcs, mut missing) = (0, Vec::new());
    for file in std::fs::read_dir(protos).unwrap() {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        let mut service = "";
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let rpc = format!("{service}.{}", rest.split('(').next().unwrap());
                let variant = format!("{rpc} (");
                if !rows
                    .iter()
                    .any(|r| r.rpc == rpc || r.rpc.starts_with(&variant))
                {
                    missing.push(rpc);
                }
                rpcs += 1;
            }
        }
    }
    assert!(missing.is_empty(), "RPCs without a row: {missing:?}");
    assert!(rpcs >= 35, "only {rpcs} RPCs found in the protos");
}
