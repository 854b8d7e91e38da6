//! `custody.v1.CeremonyService`: key ceremonies, backups, restores and
//! drills. The engine (`custody_core::ceremonies`) owns the state machine;
//! this file checks who calls and turns records into messages.
//!
//! Every call needs the officer role, and calls made as an officer (sign-in,
//! shares, components, confirmations) must come from the certificate
//! principal that officer is enrolled with. Each runs to completion in its
//! own task: a client that goes away cannot stop a step between its HSM
//! call and the journal write that records it.

use custody_proto::v1::ceremony_service_server::CeremonyService;
use custody_proto::v1::{
    AbortCeremonyRequest, Ceremony, CeremonySignature, CeremonyState, CeremonyStep,
    CollectShareRequest, CollectShareResponse, ComponentCheck, CreateBackupRequest,
    CreateBackupResponse, GetCeremonyRequest, GetTranscriptRequest, GetTranscriptResponse,
    KeyFingerprint, ListCeremoniesRequest, ListCeremoniesResponse, RestoreReport,
    StartCeremonyRequest, SubmitSecretRequest, submit_secret_request,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{Run, Shared, serve};
use crate::wire::timestamp;
use custody_core::authz::{Action, acting_officer, officer_of};
use custody_core::ceremonies::{self, SubmittedSecret};
use custody_core::ceremony::components;
use custody_core::ceremony::fingerprint::Fingerprint;
use custody_core::ceremony::journal::{CeremonyRecord, Phase};
use custody_core::ceremony::script::Script;
use custody_core::dual_control::sealed;
use custody_core::{Error, Reason};

/// The ceremony service.
pub struct CeremonyKeys(pub Shared);

/// Largest script or bundle accepted (a bundle of 10,000 RSA-4096 keys is
/// about 60 MB; the gRPC message limit applies first).
const MAX_SCRIPT: usize = 64 * 1024;
/// The largest CSR a ceremony takes (an RSA 4096 CSR is under 2 KiB).
const MAX_CSR: usize = 16 * 1024;

/// `ceremonies/{id}`: the id.
pub(super) fn parse_name(name: &str) -> Result<String, Error> {
    name.strip_prefix("ceremonies/")
        .filter(|id| !id.is_empty() && id.len() <= 48)
        .map(str::to_string)
        .ok_or_else(|| {
            Error::new(
                Reason::BadCeremonyName,
                format!(
                    "{} is not ceremonies/{{id}}",
                    custody_core::text::echo(name)
                ),
            )
        })
}

fn wire_state(phase: Phase) -> CeremonyState {
    match phase {
        Phase::AwaitingOfficers => CeremonyState::AwaitingOfficers,
        Phase::Running => CeremonyState::Running,
        Phase::AwaitingShareCollection => CeremonyState::AwaitingShareCollection,
        Phase::AwaitingComponents => CeremonyState::AwaitingComponents,
        Phase::AwaitingShares => CeremonyState::AwaitingShares,
        Phase::AwaitingConfirmation => CeremonyState::AwaitingConfirmation,
        Phase::Completed => CeremonyState::Completed,
        Phase::RolledBack => CeremonyState::RolledBack,
        Phase::Aborted => CeremonyState::Aborted,
    }
}

/// The message form of a journaled ceremony.
pub fn ceremony_message(record: &CeremonyRecord) -> Ceremony {
    let script = Script::parse(&record.script).ok();
    let steps = script
        .as_ref()
        .map(|s| {
            s.steps()
                .into_iter()
                .map(|step| CeremonyStep {
                    name: step.name().into(),
                    done: step_done(record, step.name()),
                })
                .collect()
        })
        .unwrap_or_default();
    let certification = record.certification.as_ref();
    let tbs_der = certification
        .and_then(|c| hex::decode(&c.tbs_der_hex).ok())
        .unwrap_or_default();
    let tbs_fingerprint = (!tbs_der.is_empty()).then(|| {
        let fingerprint = Fingerprint::of_der(&tbs_der);
        KeyFingerprint {
            value: fingerprint.bytes().to_vec(),
            hex: fingerprint.hex_groups(),
            words: fingerprint.words().unwrap_or_default(),
        }
    });
    // A key-destruction ceremony's manifest: its SHA-256, read as a TBS's.
    let manifest_fingerprint = record.destruction.as_ref().map(|d| {
        let fingerprint = Fingerprint::of_der(d.manifest.as_bytes());
        KeyFingerprint {
            value: fingerprint.bytes().to_vec(),
            hex: fingerprint.hex_groups(),
            words: fingerprint.words().unwrap_or_default(),
        }
    });
    let fingerprint = record.key.as_ref().and_then(|key| {
        let bytes = hex::decode(&key.fingerprint).ok()?;
        let fingerprint = if key.public_key_der_hex.is_empty() {
            Fingerprint::of_kcv(bytes.as_slice().try_into().ok()?)
        } else {
            Fingerprint::of_public_key(&hex::decode(&key.public_key_der_hex).ok()?)
        };
        Some(KeyFingerprint {
            value: bytes,
            hex: fingerprint.hex_groups(),
            words: fingerprint.words().unwrap_or_default(),
        })
    });
    Ceremony {
        name: format!("ceremonies/{}", record.id),
        kind: record.kind.clone(),
        script_digest: script
            .as_ref()
            .map(|s| s.digest().to_vec())
            .unwrap_or_default(),
        state: wire_state(record.phase) as i32,
        waiting_for: script
            .as_ref()
            .map(|script| custody_core::ceremonies::waiting_for(record, script))
            .unwrap_or_default(),
        present: record.present.iter().map(|s| s.officer.clone()).collect(),
        confirmed: record.confirmed.iter().map(|s| s.officer.clone()).collect(),
        steps,
        fingerprint: fingerprint.or(tbs_fingerprint).or(manifest_fingerprint),
        public_key_der: record
            .key
            .as_ref()
            .and_then(|k| hex::decode(&k.public_key_der_hex).ok())
            .unwrap_or_default(),
        certificate_pem: record
            .key
            .as_ref()
            .map(|k| k.certificate_pem.clone())
            .or_else(|| certification.map(|c| c.certificate_pem.clone()))
            .unwrap_or_default(),
        shares_collected: record.shares_collected.clone(),
        components: record
            .components
            .iter()
            .map(|c| ComponentCheck {
                custodian: c.custodian.clone(),
                kcv: c.kcv.clone(),
            })
            .collect(),
        shares_submitted: record.shares_submitted.clone(),
        shares_needed: record.shares_needed,
        backup_bundle: record.backup_bundle.clone(),
        restore: record.restore.as_ref().map(|r| RestoreReport {
            keys: r.keys,
            verified: r.verified,
            rto_ms: r.rto_ms,
            scratch_objects_destroyed: r.scratch_objects_destroyed,
            drill: r.drill,
            suspended_keys: r
                .suspended_keys
                .iter()
                .map(|k| format!("keys/{k}"))
                .collect(),
        }),
        error: record.error.clone(),
        create_time: Some(timestamp(record.created_ms)),
        update_time: Some(timestamp(record.updated_ms)),
        transcript_head: record.transcript.head.clone(),
        key: record
            .key
            .as_ref()
            .map(|k| format!("keys/{}", k.key_id))
            .or_else(|| {
                // A CSR's key is not in custody: no key to name.
                certification
                    .filter(|c| !c.key_id.is_empty())
                    .map(|c| format!("keys/{}", c.key_id))
            })
            .or_else(|| {
                record
                    .destruction
                    .as_ref()
                    .map(|d| format!("keys/{}", d.key_id))
            })
            .unwrap_or_default(),
        tbs_summary: match &record.destruction {
            Some(d) => vec![d.manifest.clone()],
            None => certification.map(|c| c.summary.clone()).unwrap_or_default(),
        },
        // A key-destruction ceremony's manifest: the bytes whose SHA-256
        // the officers confirm, so their client recomputes it.
        tbs_der: match &record.destruction {
            Some(d) => d.manifest.as_bytes().to_vec(),
            None => tbs_der,
        },
    }
}

fn step_done(record: &CeremonyRecord, step: &str) -> bool {
    match step {
        "sign-in" => record.phase != Phase::AwaitingOfficers,
        "confirm" => record.phase == Phase::Completed,
        "submit-shares" => record.did("restore"),
        "rebuild-kek" | "unwrap" | "verify" | "destroy-scratch" => record.did("restore"),
        other => record.did(other),
    }
}

#[tonic::async_trait]
impl CeremonyService for CeremonyKeys {
    async fn start_ceremony(
        &self,
        request: Request<StartCeremonyRequest>,
    ) -> Result<Response<Ceremony>, Status> {
        serve(
            &self.0,
            "StartCeremony",
            Action::Ceremony,
            request,
            Run::ToCompletion,
            |_| String::new(),
            |state, audited, principal, request| {
                Box::pin(async move {
                    if request.script.len() > MAX_SCRIPT {
                        return Err(Error::new(
                            Reason::ScriptTooLarge,
                            format!("a script is at most {MAX_SCRIPT} bytes"),
                        ));
                    }
                    audited.detail = format!(
                        "script sha256 {}",
                        hex::encode(custody_core::ceremony::script::script_digest(
                            request.script.as_bytes()
                        ))
                    );
                    if request.csr.len() > MAX_CSR {
                        return Err(Error::new(
                            Reason::BadCsr,
                            format!("a CSR is at most {MAX_CSR} bytes"),
                        ));
                    }
                    if request.certificate.len() > MAX_CSR {
                        return Err(Error::new(
                            Reason::BadCrossSignCertificate,
                            format!("a certificate to cross-sign is at most {MAX_CSR} bytes"),
                        ));
                    }
                    let record = ceremonies::open(
                        state,
                        &principal.name,
                        request.script,
                        request.bundle,
                        ceremonies::Outside {
                            csr: request.csr,
                            certificate: request.certificate,
                        },
                    )
                    .await?;
                    Ok(ceremony_message(&record))
                })
            },
        )
        .await
    }

    async fn get_ceremony(
        &self,
        request: Request<GetCeremonyRequest>,
    ) -> Result<Response<Ceremony>, Status> {
        serve(
            &self.0,
            "GetCeremony",
            Action::ReadCeremonies,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |state, _, _, request| {
                Box::pin(async move {
                    let name = request.name;
                    let record = ceremonies::found(state, &parse_name(&name)?)?;
                    Ok(ceremony_message(&record))
                })
            },
        )
        .await
    }

    async fn list_ceremonies(
        &self,
        request: Request<ListCeremoniesRequest>,
    ) -> Result<Response<ListCeremoniesResponse>, Status> {
        serve(
            &self.0,
            "ListCeremonies",
            Action::ReadCeremonies,
            request,
            Run::ToCompletion,
            |_| String::new(),
            |state, _, _, _| {
                Box::pin(async move {
                    let records = state
                        .ceremonies
                        .journal
                        .list()
                        .map_err(ceremonies::journal_failure)?;
                    Ok(ListCeremoniesResponse {
                        ceremonies: records.iter().map(ceremony_message).collect(),
                    })
                })
            },
        )
        .await
    }

    async fn sign_in(
        &self,
        request: Request<CeremonySignature>,
    ) -> Result<Response<Ceremony>, Status> {
        serve(
            &self.0,
            "SignIn",
            Action::Ceremony,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |state, _, principal, request| {
                Box::pin(async move {
                    let id = parse_name(&request.name)?;
                    acting_officer(state, &principal, &request.officer_id)?;
                    let record =
                        ceremonies::sign_in(state, &id, &request.officer_id, &request.signature)
                            .await?;
                    Ok(ceremony_message(&record))
                })
            },
        )
        .await
    }

    async fn collect_share(
        &self,
        request: Request<CollectShareRequest>,
    ) -> Result<Response<CollectShareResponse>, Status> {
        serve(
            &self.0,
            "CollectShare",
            Action::Ceremony,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |state, _, principal, request| {
                Box::pin(async move {
                    let id = parse_name(&request.name)?;
                    acting_officer(state, &principal, &request.officer_id)?;
                    let (share, backup_kek_kcv, record) =
                        ceremonies::collect_share(state, &id, &request.officer_id).await?;
                    let text = Zeroizing::new(share.to_text());
                    let seal = Script::parse(&record.script)
                        .map(|script| script.seal_shares())
                        .unwrap_or(false);
                    if seal {
                        let officer =
                            state
                                .dual_control
                                .officer(&request.officer_id)
                                .ok_or_else(|| {
                                    Error::new(
                                        Reason::OfficerNotEnrolled,
                                        "officer left mid-ceremony",
                                    )
                                })?;
                        let public_key = hex::decode(&officer.public_key).unwrap_or_default();
                        let sealed_share =
                            sealed::seal(&public_key, text.as_bytes()).map_err(Error::internal)?;
                        Ok(CollectShareResponse {
                            share: String::new(),
                            sealed_share,
                            backup_kek_kcv,
                        })
                    } else {
                        Ok(CollectShareResponse {
                            share: text.to_string(),
                            sealed_share: Vec::new(),
                            backup_kek_kcv,
                        })
                    }
                })
            },
        )
        .await
    }

    async fn submit_secret(
        &self,
        request: Request<SubmitSecretRequest>,
    ) -> Result<Response<Ceremony>, Status> {
        serve(
            &self.0,
            "SubmitSecret",
            Action::Ceremony,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |state, _, principal, request| {
                Box::pin(async move {
                    let id = parse_name(&request.name)?;
                    acting_officer(state, &principal, &request.officer_id)?;
                    let secret = match request.secret {
                        Some(submit_secret_request::Secret::ComponentHex(hex)) => {
                            let hex = Zeroizing::new(hex);
                            SubmittedSecret::Component {
                                value: components::parse_component(&hex)
                                    .map_err(|e| Error::new(Reason::BadComponent, e))?,
                                expected_kcv: request.expected_kcv.clone(),
                            }
                        }
                        Some(submit_secret_request::Secret::Share(share)) => {
                            SubmittedSecret::Share(Zeroizing::new(share))
                        }
                        None => {
                            return Err(Error::new(
                                Reason::NoSecret,
                                "send a component or a share",
                            ));
                        }
                    };
                    let record =
                        ceremonies::submit_secret(state, &id, &request.officer_id, secret).await?;
                    Ok(ceremony_message(&record))
                })
            },
        )
        .await
    }

    async fn confirm(
        &self,
        request: Request<CeremonySignature>,
    ) -> Result<Response<Ceremony>, Status> {
        serve(
            &self.0,
            "Confirm",
            Action::Ceremony,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |state, _, principal, request| {
                Box::pin(async move {
                    let id = parse_name(&request.name)?;
                    acting_officer(state, &principal, &request.officer_id)?;
                    let record =
                        ceremonies::confirm(state, &id, &request.officer_id, &request.signature)
                            .await?;
                    Ok(ceremony_message(&record))
                })
            },
        )
        .await
    }

    async fn abort_ceremony(
        &self,
        request: Request<AbortCeremonyRequest>,
    ) -> Result<Response<Ceremony>, Status> {
        serve(
            &self.0,
            "AbortCeremony",
            Action::Ceremony,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |state, _, principal, request| {
                Box::pin(async move {
                    let id = parse_name(&request.name)?;
                    let officer = officer_of(state, &principal)?;
                    let record =
                        ceremonies::abort(state, &id, &officer.officer_id, &request.reason).await?;
                    Ok(ceremony_message(&record))
                })
            },
        )
        .await
    }

    async fn get_transcript(
        &self,
        request: Request<GetTranscriptRequest>,
    ) -> Result<Response<GetTranscriptResponse>, Status> {
        serve(
            &self.0,
            "GetTranscript",
            Action::ReadCeremonies,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |state, _, _, request| {
                Box::pin(async move {
                    let name = request.name;
                    let record = ceremonies::found(state, &parse_name(&name)?)?;
                    Ok(GetTranscriptResponse {
                        markdown: record.transcript.to_markdown(),
                        json: record.transcript.to_json(),
                        audit_key_pem: state.audit.audit_key_pem().to_string(),
                    })
                })
            },
        )
        .await
    }

    async fn create_backup(
        &self,
        request: Request<CreateBackupRequest>,
    ) -> Result<Response<CreateBackupResponse>, Status> {
        serve(
            &self.0,
            "CreateBackup",
            Action::Ceremony,
            request,
            Run::ToCompletion,
            |_| String::new(),
            |_, _, _, _| {
                Box::pin(async move {
                    // I1: a backup is a CREATE_BACKUP operation the
                    // administrative quorum approves; no one makes one alone.
                    Err::<CreateBackupResponse, _>(Error::new(
                        Reason::QuorumRequired,
                        "a backup needs the administrative quorum: request a CREATE_BACKUP operation (custodyctl request backup); the approved operation holds the bundle",
                    ))
                })
            },
        )
        .await
    }
}
