//! Driving ceremonies over gRPC as the officers would, for the in-process
//! and the SIGKILL tests: scripts, and one call per officer step, each
//! signed with that officer's own key over that officer's own channel.

use std::collections::BTreeMap;

use custody_core::ceremonies::{confirmation_message, presence_message};
use custody_core::ceremony::script::script_digest;
use custody_core::dual_control::approval_message;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    BackupKekSpec, BackupSpec, Ceremony, CeremonySignature, CollectShareRequest,
    CreateBackupRequest, GetCeremonyRequest, Operation, OperationSpec, OperationState,
    RequestOperationRequest, StartCeremonyRequest, SubmitSecretRequest, VoteRequest,
    operation_spec, submit_secret_request,
};
use sha2::Digest;
use tonic::Status;
use tonic::transport::Channel;

/// A root-key script: 2 of alice, bob, carol; an EC P-256 key `key`,
/// backup-exportable, signers `ca-issuing`; with a root certificate if
/// `certificate`.
pub fn root_script(id: &str, key: &str, certificate: bool) -> String {
    let mut script = format!(
        "format = 1\nid = \"{id}\"\nkind = \"root-key\"\ndescription = \"test root key\"\n\
         [quorum]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n\
         [key]\nname = \"{key}\"\nalgorithm = \"EC_SIGN_P256_SHA256\"\nbackup = true\n\
         signers = [\"ca-issuing\"]\n"
    );
    if certificate {
        script.push_str(
            "[certificate]\ncountry = \"DE\"\ncommon_name = \"Test Root CA\"\norganization = \"Custody Tests\"\nvalidity_days = 30\n",
        );
    }
    script
}

/// A KEK script, generate mode: AES key `key`, backup KEK split 2 of
/// alice, bob, carol.
pub fn kek_script(id: &str, key: &str, sealed: bool) -> String {
    format!(
        "format = 1\nid = \"{id}\"\nkind = \"kek\"\ndescription = \"test KEK\"\n\
         [quorum]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n\
         [key]\nname = \"{key}\"\nalgorithm = \"AES_256_GCM\"\nsigners = [\"ca-issuing\"]\n\
         [kek]\nmode = \"generate\"\n\
         [shares]\nthreshold = 2\ncustodians = [\"alice\", \"bob\", \"carol\"]\n\
         encrypt_to_officer_keys = {sealed}\n"
    )
}

/// A KEK script, components mode: alice, bob and carol each enter one.
pub fn components_script(id: &str, key: &str) -> String {
    format!(
        "format = 1\nid = \"{id}\"\nkind = \"kek\"\ndescription = \"test KEK from components\"\n\
         [quorum]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n\
         [key]\nname = \"{key}\"\nalgorithm = \"AES_256_GCM\"\n\
         [kek]\nmode = \"components\"\n\
         [components]\ncustodians = [\"alice\", \"bob\", \"carol\"]\n"
    )
}

/// A restore (or drill) script for `bundle` that pins no audit key: the
/// bundle must be signed by the daemon's own audit key or one its config
/// pins.
pub fn restore_script(id: &str, bundle: &str, drill: bool) -> String {
    format!(
        "format = 1\nid = \"{id}\"\nkind = \"restore\"\ndescription = \"test restore\"\n\
         [quorum]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n\
         [restore]\nbundle = \"bundle.json\"\nbundle_sha256 = \"{}\"\ndrill = {drill}\n\
         custodians = [\"alice\", \"bob\", \"carol\"]\n",
        hex::encode(sha2::Sha256::digest(bundle.as_bytes()))
    )
}

/// [`restore_script`] pinning the audit key whose SPKI DER has SHA-256
/// `audit_key_sha256` (hex), as the source published it
/// (`restore.audit_key_sha256`).
pub fn pinned_restore_script(
    id: &str,
    bundle: &str,
    drill: bool,
    audit_key_sha256: &str,
) -> String {
    format!(
        "{}audit_key_sha256 = \"{audit_key_sha256}\"\n",
        restore_script(id, bundle, drill)
    )
}

/// The SHA-256 (hex) of a running daemon's audit key, SPKI DER: what it
/// publishes for restores elsewhere to pin.
pub fn audit_key_sha256(service: &crate::service::TestService) -> String {
    hex::encode(sha2::Sha256::digest(service.state().audit.audit_key_spki()))
}

/// The officers, each with their key and their own channel.
pub struct Officers<'k> {
    keys: BTreeMap<String, &'k OfficerKey>,
    channels: BTreeMap<String, Channel>,
}

impl<'k> Officers<'k> {
    /// From the officers' keys and their channels (by officer id).
    pub fn new(keys: &'k [OfficerKey], channels: BTreeMap<String, Channel>) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|k| (k.officer_id().to_string(), k))
                .collect(),
            channels,
        }
    }

    /// The ceremony client of `officer`.
    pub fn client(&self, officer: &str) -> CeremonyServiceClient<Channel> {
        CeremonyServiceClient::new(self.channels[officer].clone())
    }

    /// `officer` opens a ceremony.
    pub async fn start(
        &self,
        officer: &str,
        script: &str,
        bundle: &str,
    ) -> Result<Ceremony, Status> {
        self.start_with(
            officer,
            StartCeremonyRequest {
                script: script.into(),
                bundle: bundle.into(),
                csr: Vec::new(),
                certificate: Vec::new(),
            },
        )
        .await
    }

    /// `officer` opens a ceremony with `request` (a CSR or a certificate
    /// sent with the script).
    pub async fn start_with(
        &self,
        officer: &str,
        request: StartCeremonyRequest,
    ) -> Result<Ceremony, Status> {
        self.client(officer)
            .start_ceremony(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// A certifying ceremony run whole with `request` (the script and the
    /// CSR or certificate sent with it): alice opens it, alice and bob sign
    /// in and confirm the fingerprint. The ceremony as it awaited the
    /// confirmations and as it ended; panics unless it completes.
    pub async fn certify_whole(&self, request: StartCeremonyRequest) -> (Ceremony, Ceremony) {
        use custody_proto::v1::CeremonyState;
        let script = request.script.clone();
        let opened = self
            .start_with("alice", request)
            .await
            .unwrap_or_else(|e| panic!("open: {e}"));
        let name = opened.name;
        self.sign_in("alice", &name, &script)
            .await
            .unwrap_or_else(|e| panic!("alice signs in: {e}"));
        let waiting = self
            .sign_in("bob", &name, &script)
            .await
            .unwrap_or_else(|e| panic!("bob signs in: {e}"));
        assert_eq!(
            waiting.state,
            CeremonyState::AwaitingConfirmation as i32,
            "{}",
            waiting.error
        );
        let fingerprint = waiting
            .fingerprint
            .clone()
            .map(|f| f.value)
            .unwrap_or_default();
        self.confirm("alice", &name, &script, &fingerprint)
            .await
            .unwrap_or_else(|e| panic!("alice confirms: {e}"));
        let done = self
            .confirm("bob", &name, &script, &fingerprint)
            .await
            .unwrap_or_else(|e| panic!("bob confirms: {e}"));
        assert_eq!(
            done.state,
            CeremonyState::Completed as i32,
            "{}",
            done.error
        );
        (waiting, done)
    }

    /// Opening with `request` is refused with the reason `expected`, and no
    /// ceremony of the script's id was journaled: nothing signed in,
    /// nothing asked of the HSM.
    pub async fn refused_at_open(&self, request: StartCeremonyRequest, expected: &str) {
        let id = request
            .script
            .lines()
            .find_map(|l| l.strip_prefix("id = "))
            .map(|id| id.trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("the script names no id"));
        let error = match self.start_with("alice", request).await {
            Ok(opened) => panic!("{} opened; expected {expected}", opened.name),
            Err(error) => error,
        };
        assert_eq!(
            crate::service::reason(&error),
            expected,
            "{}",
            error.message()
        );
        let none = match self
            .client("alice")
            .get_ceremony(GetCeremonyRequest {
                name: format!("ceremonies/{id}"),
            })
            .await
        {
            Ok(found) => panic!(
                "ceremonies/{id} was journaled: {:?}",
                found.into_inner().state
            ),
            Err(none) => none,
        };
        assert_eq!(
            crate::service::reason(&none),
            "NOT_FOUND",
            "{}",
            none.message()
        );
    }

    /// Reads a ceremony.
    pub async fn get(&self, officer: &str, name: &str) -> Result<Ceremony, Status> {
        self.client(officer)
            .get_ceremony(GetCeremonyRequest { name: name.into() })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `officer` signs in to the ceremony `name` run from `script`.
    pub async fn sign_in(
        &self,
        officer: &str,
        name: &str,
        script: &str,
    ) -> Result<Ceremony, Status> {
        let digest = script_digest(script.as_bytes());
        self.client(officer)
            .sign_in(CeremonySignature {
                name: name.into(),
                officer_id: officer.into(),
                signature: self.keys[officer].sign(&presence_message(&digest)).to_vec(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `officer` collects their share (opening it if sealed).
    pub async fn collect(&self, officer: &str, name: &str) -> Result<String, Status> {
        let response = self
            .client(officer)
            .collect_share(CollectShareRequest {
                name: name.into(),
                officer_id: officer.into(),
            })
            .await?
            .into_inner();
        if response.sealed_share.is_empty() {
            Ok(response.share)
        } else {
            let opened = self.keys[officer]
                .open_sealed(&response.sealed_share)
                .map_err(Status::internal)?;
            Ok(String::from_utf8(opened.to_vec()).map_err(|e| Status::internal(e.to_string()))?)
        }
    }

    /// `officer` confirms the fingerprint `fingerprint` of ceremony `name`.
    pub async fn confirm(
        &self,
        officer: &str,
        name: &str,
        script: &str,
        fingerprint: &[u8],
    ) -> Result<Ceremony, Status> {
        let digest = script_digest(script.as_bytes());
        self.client(officer)
            .confirm(CeremonySignature {
                name: name.into(),
                officer_id: officer.into(),
                signature: self.keys[officer]
                    .sign(&confirmation_message(&digest, fingerprint))
                    .to_vec(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `officer` submits a share.
    pub async fn submit_share(
        &self,
        officer: &str,
        name: &str,
        share: &str,
    ) -> Result<Ceremony, Status> {
        self.submit(
            officer,
            name,
            submit_secret_request::Secret::Share(share.into()),
            "",
        )
        .await
    }

    /// `officer` submits a component with the check value `kcv`.
    pub async fn submit_component(
        &self,
        officer: &str,
        name: &str,
        component_hex: &str,
        kcv: &str,
    ) -> Result<Ceremony, Status> {
        self.submit(
            officer,
            name,
            submit_secret_request::Secret::ComponentHex(component_hex.into()),
            kcv,
        )
        .await
    }

    async fn submit(
        &self,
        officer: &str,
        name: &str,
        secret: submit_secret_request::Secret,
        kcv: &str,
    ) -> Result<Ceremony, Status> {
        self.client(officer)
            .submit_secret(SubmitSecretRequest {
                name: name.into(),
                officer_id: officer.into(),
                secret: Some(secret),
                expected_kcv: kcv.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `officer` alone asks for a backup bundle with the direct
    /// `CreateBackup` (refused: a backup is a quorum operation, I1).
    pub async fn backup(&self, officer: &str) -> Result<String, Status> {
        self.client(officer)
            .create_backup(CreateBackupRequest {})
            .await
            .map(|r| r.into_inner().bundle)
    }

    /// `officer` requests a CREATE_BACKUP operation.
    pub async fn request_backup(&self, officer: &str) -> Result<Operation, Status> {
        OperationServiceClient::new(self.channels[officer].clone())
            .request_operation(RequestOperationRequest {
                spec: Some(OperationSpec {
                    spec: Some(operation_spec::Spec::CreateBackup(BackupSpec::default())),
                }),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `officer` approves `operation`, signing its digest with their key.
    pub async fn approve(&self, officer: &str, operation: &Operation) -> Result<Operation, Status> {
        let digest: [u8; 32] = operation
            .digest
            .clone()
            .try_into()
            .map_err(|_| Status::internal("not a 32-byte digest"))?;
        OperationServiceClient::new(self.channels[officer].clone())
            .approve_operation(VoteRequest {
                name: operation.name.clone(),
                officer_id: officer.into(),
                signature: self.keys[officer].sign(&approval_message(&digest)).to_vec(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A backup bundle of every backup-exportable key: `requester` asks for
    /// it, `approvers` approve in turn until the operation is no longer
    /// pending; the bundle from the succeeded operation.
    pub async fn approved_backup(
        &self,
        requester: &str,
        approvers: &[&str],
    ) -> Result<String, Status> {
        let asked = self.request_backup(requester).await?;
        let operation = self.approve_in_turn(asked, approvers).await?;
        if operation.backup_bundle.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no bundle: operation {} is {:?}: {}",
                operation.name,
                OperationState::try_from(operation.state),
                operation.error
            )));
        }
        Ok(operation.backup_bundle)
    }

    /// `approvers` approve `operation` in turn until it is no longer
    /// pending; the operation as it ends.
    pub async fn approve_in_turn(
        &self,
        mut operation: Operation,
        approvers: &[&str],
    ) -> Result<Operation, Status> {
        for approver in approvers {
            if operation.state != OperationState::Pending as i32 {
                break;
            }
            operation = self.approve(approver, &operation).await?;
        }
        Ok(operation)
    }

    /// `officer` requests an ACTIVATE_BACKUP_KEK operation naming the KEK
    /// ceremony `ceremony` (`ceremonies/{id}`).
    pub async fn request_activation(
        &self,
        officer: &str,
        ceremony: &str,
    ) -> Result<Operation, Status> {
        OperationServiceClient::new(self.channels[officer].clone())
            .request_operation(RequestOperationRequest {
                spec: Some(OperationSpec {
                    spec: Some(operation_spec::Spec::ActivateBackupKek(BackupKekSpec {
                        ceremony: ceremony.into(),
                        ..Default::default()
                    })),
                }),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Makes the backup KEK of `ceremony` the current one: `requester` asks,
    /// `approvers` approve in turn; refused unless the operation succeeds.
    pub async fn activate_backup_kek(
        &self,
        requester: &str,
        approvers: &[&str],
        ceremony: &str,
    ) -> Result<Operation, Status> {
        let asked = self.request_activation(requester, ceremony).await?;
        let operation = self.approve_in_turn(asked, approvers).await?;
        if operation.state != OperationState::Succeeded as i32 {
            return Err(Status::failed_precondition(format!(
                "the backup KEK of {ceremony} was not activated: operation {} is {:?}: {}",
                operation.name,
                OperationState::try_from(operation.state),
                operation.error
            )));
        }
        Ok(operation)
    }

    /// Runs a generate-mode KEK ceremony as [`Self::run`] does, then has
    /// the administrative quorum make its backup KEK the one backups use
    /// (alice asks, bob and carol approve). Refused unless the ceremony
    /// completed and the activation succeeded; the ceremony and the shares
    /// collected.
    pub async fn run_backup_kek(
        &self,
        script: &str,
    ) -> Result<(Ceremony, BTreeMap<String, String>), Status> {
        let (done, shares) = self.run(script).await?;
        if done.state != custody_proto::v1::CeremonyState::Completed as i32 {
            return Err(Status::failed_precondition(format!(
                "{} did not complete: {}",
                done.name, done.error
            )));
        }
        self.activate_backup_kek("alice", &["bob", "carol"], &done.name)
            .await?;
        Ok((done, shares))
    }

    /// The CA tests' root: `root-ca`, EC P-384 with a 3650-day root
    /// certificate, made by a completed root ceremony `c-root`; its
    /// certificate (PEM). Panics if the ceremony does not complete.
    pub async fn ca_root(&self) -> String {
        let script = root_script("c-root", "root-ca", true)
            .replace("validity_days = 30", "validity_days = 3650")
            .replace("EC_SIGN_P256_SHA256", "EC_SIGN_P384_SHA384");
        let (done, _) = self
            .run(&script)
            .await
            .unwrap_or_else(|e| panic!("the root ceremony: {e}"));
        assert_eq!(
            done.state,
            custody_proto::v1::CeremonyState::Completed as i32,
            "the root ceremony: {}",
            done.error
        );
        done.certificate_pem
    }

    /// Runs a root-key or KEK ceremony from start to commit with alice and
    /// bob present (carol collects her share only); returns the ceremony and
    /// the shares collected, by officer.
    pub async fn run(&self, script: &str) -> Result<(Ceremony, BTreeMap<String, String>), Status> {
        self.run_sending(script, Vec::new()).await
    }

    /// [`Officers::run`] of a cross-sign script, sending `certificate` with
    /// the start (empty for any other script).
    pub async fn run_sending(
        &self,
        script: &str,
        certificate: Vec<u8>,
    ) -> Result<(Ceremony, BTreeMap<String, String>), Status> {
        let opened = self
            .start_with(
                "alice",
                StartCeremonyRequest {
                    script: script.into(),
                    bundle: String::new(),
                    csr: Vec::new(),
                    certificate,
                },
            )
            .await?;
        let name = opened.name.clone();
        self.sign_in("alice", &name, script).await?;
        let mut ceremony = self.sign_in("bob", &name, script).await?;
        let mut shares = BTreeMap::new();
        if ceremony.state == custody_proto::v1::CeremonyState::AwaitingShareCollection as i32 {
            for officer in ["alice", "bob", "carol"] {
                shares.insert(officer.to_string(), self.collect(officer, &name).await?);
            }
            ceremony = self.get("alice", &name).await?;
        }
        let fingerprint = ceremony
            .fingerprint
            .as_ref()
            .map(|f| f.value.clone())
            .unwrap_or_default();
        self.confirm("alice", &name, script, &fingerprint).await?;
        let done = self.confirm("bob", &name, script, &fingerprint).await?;
        Ok((done, shares))
    }
}
