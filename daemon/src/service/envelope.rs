//! `custody.v1.EnvelopeService`: AES-256-GCM encryption, data keys and
//! rewrap under keys of purpose ENCRYPT_DECRYPT. The ciphertext format,
//! associated data and nonce budget are in [`custody_core::envelope`].
//!
//! Each request checks, in order: caller and role, request sizes, the key
//! (its purpose, the allow-list), the ciphertext's layout, the version's
//! state ([`check_usable`]), the nonce budget; only then does it reach the
//! HSM. The GCM work runs on an HSM worker thread, and for Rewrap the
//! plaintext exists only inside that one closure, in zeroizing memory.

use std::time::Instant;

use custody_proto::v1::envelope_service_server::EnvelopeService;
use custody_proto::v1::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, GenerateDataKeyRequest,
    GenerateDataKeyResponse, RewrapRequest, RewrapResponse,
};
use hsm_shim::{GcmCiphertext, KeyLabel};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::keys::{algorithm_of, check_usable};
use super::{Audited, Shared, caller, require};
use custody_core::Custody;
use custody_core::envelope::{BudgetError, Envelope, assemble, seal_header};
use custody_core::identity::{Principal, Role};
use custody_core::lifecycle::Use;
use custody_core::metrics;
use custody_core::names::{parse_key_name, version_name};
use custody_core::registry::{KeyRecord, VersionRecord};
use custody_core::{Error, Reason};

/// The envelope service.
pub struct EnvelopeKeys(pub Shared);

/// Largest plaintext Encrypt takes, and largest associated data.
pub const MAX_PLAINTEXT: usize = 64 * 1024;
/// Length of a generated data key.
pub const DATA_KEY_LEN: usize = 32;

/// The key `name` names, if `principal` may use it for encryption.
fn usable_key(
    state: &Custody,
    principal: &Principal,
    name: &str,
) -> Result<std::sync::Arc<KeyRecord>, Error> {
    require(principal, Role::Signer)?;
    let key_id = parse_key_name(name)?;
    let record = state
        .registry
        .get(key_id)
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
    if algorithm_of(&record)?.sign_algorithm().is_some() {
        return Err(Error::new(
            Reason::WrongPurpose,
            format!("keys/{key_id} is a signing key, not an ENCRYPT_DECRYPT key"),
        ));
    }
    if !record.allowed_signers.contains(&principal.name) {
        return Err(Error::new(
            Reason::NotAllowedSigner,
            format!(
                "{} is not on the allow-list of keys/{key_id}",
                principal.name
            ),
        ));
    }
    Ok(record)
}

fn check_size(what: &str, bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() > MAX_PLAINTEXT {
        return Err(Error::new(
            Reason::TooLarge,
            format!("{what} is {} bytes; at most {MAX_PLAINTEXT}", bytes.len()),
        ));
    }
    Ok(())
}

/// The primary version, checked for protection, with one encryption taken
/// from its nonce budget.
async fn protecting_version(
    state: &Custody,
    record: &KeyRecord,
) -> Result<(VersionRecord, KeyLabel), Error> {
    let version = record
        .version(record.primary_version)
        .ok_or_else(|| Error::new(Reason::NotFound, "the primary version is missing"))?
        .clone();
    check_usable(record, &version, Use::Protect, state.clock.now_ms())?;
    state
        .budget
        .take(&version.hsm_label)
        .await
        .map_err(|e| match e {
            BudgetError::Exhausted { .. } => {
                Error::new(Reason::NonceBudgetExhausted, e.to_string())
            }
            BudgetError::Store(_) => {
                tracing::error!(error = %e, "nonce budget");
                Error::new(
                    Reason::StoreUnavailable,
                    "the encryption count cannot be made durable",
                )
            }
        })?;
    let label = KeyLabel::new(version.hsm_label.clone())?;
    Ok((version, label))
}

/// The version a ciphertext names, checked for `usage`.
fn source_version<'c>(
    state: &Custody,
    record: &KeyRecord,
    ciphertext: &'c [u8],
    usage: Use,
) -> Result<(Envelope<'c>, VersionRecord, KeyLabel), Error> {
    let envelope = Envelope::parse(ciphertext)
        .map_err(|e| Error::new(Reason::BadCiphertext, e.to_string()))?;
    if envelope.key_id != record.key_id {
        return Err(Error::new(
            Reason::CiphertextKeyMismatch,
            format!(
                "the ciphertext was made by keys/{}, not keys/{}",
                envelope.key_id, record.key_id
            ),
        ));
    }
    let version = record
        .version(envelope.version)
        .ok_or_else(|| {
            Error::new(
                Reason::NotFound,
                format!(
                    "no version {}",
                    version_name(&record.key_id, envelope.version)
                ),
            )
        })?
        .clone();
    check_usable(record, &version, usage, state.clock.now_ms())?;
    let label = KeyLabel::new(version.hsm_label.clone())?;
    Ok((envelope, version, label))
}

impl EnvelopeKeys {
    async fn run_encrypt(
        &self,
        audited: &mut Audited,
        principal: &Principal,
        request: EncryptRequest,
    ) -> Result<EncryptResponse, Error> {
        let state = &self.0;
        check_size("plaintext", &request.plaintext)?;
        check_size("associated_data", &request.associated_data)?;
        let record = usable_key(state, principal, &request.name)?;
        let (version, label) = protecting_version(state, &record).await?;
        let name = version_name(&record.key_id, version.version);
        audited.resource = name.clone();
        audited.detail = format!("{} bytes", request.plaintext.len());
        let (header, aad) = seal_header(&record.key_id, version.version, &request.associated_data);
        let plaintext = Zeroizing::new(request.plaintext);
        let sealed = state
            .hsm
            .run(move |session| session.encrypt_gcm(&label, &aad, &plaintext))
            .await?;
        Ok(EncryptResponse {
            name,
            ciphertext: assemble(header, sealed.iv, &sealed.ciphertext_and_tag),
        })
    }

    async fn run_decrypt(
        &self,
        audited: &mut Audited,
        principal: &Principal,
        request: DecryptRequest,
    ) -> Result<DecryptResponse, Error> {
        let state = &self.0;
        check_size("associated_data", &request.associated_data)?;
        let record = usable_key(state, principal, &request.name)?;
        let (envelope, version, label) =
            source_version(state, &record, &request.ciphertext, Use::Process)?;
        let name = version_name(&record.key_id, version.version);
        audited.resource = name.clone();
        let aad = envelope.gcm_aad(&request.associated_data);
        let sealed = GcmCiphertext {
            iv: envelope.nonce,
            ciphertext_and_tag: envelope.sealed.to_vec(),
        };
        let plaintext = state
            .hsm
            .run(move |session| session.decrypt_gcm(&label, &aad, &sealed))
            .await?;
        audited.detail = format!("{} bytes", plaintext.len());
        Ok(DecryptResponse {
            name,
            plaintext: plaintext.to_vec(),
        })
    }

    async fn run_generate_data_key(
        &self,
        audited: &mut Audited,
        principal: &Principal,
        request: GenerateDataKeyRequest,
    ) -> Result<GenerateDataKeyResponse, Error> {
        let state = &self.0;
        check_size("associated_data", &request.associated_data)?;
        let record = usable_key(state, principal, &request.name)?;
        let (version, label) = protecting_version(state, &record).await?;
        let name = version_name(&record.key_id, version.version);
        audited.resource = name.clone();
        let (header, aad) = seal_header(&record.key_id, version.version, &request.associated_data);
        let (data_key, sealed) = state
            .hsm
            .run(move |session| {
                let mut data_key = Zeroizing::new([0u8; DATA_KEY_LEN]);
                session.random(data_key.as_mut())?;
                let sealed = session.encrypt_gcm(&label, &aad, data_key.as_ref())?;
                Ok((data_key, sealed))
            })
            .await?;
        Ok(GenerateDataKeyResponse {
            name,
            plaintext: data_key.to_vec(),
            wrapped: assemble(header, sealed.iv, &sealed.ciphertext_and_tag),
        })
    }

    async fn run_rewrap(
        &self,
        audited: &mut Audited,
        principal: &Principal,
        request: RewrapRequest,
    ) -> Result<RewrapResponse, Error> {
        let state = &self.0;
        check_size("associated_data", &request.associated_data)?;
        let record = usable_key(state, principal, &request.name)?;
        let (envelope, source, source_label) =
            source_version(state, &record, &request.ciphertext, Use::Process)?;
        let source_name = version_name(&record.key_id, source.version);
        audited.resource = source_name.clone();
        let (target, target_label) = protecting_version(state, &record).await?;
        let name = version_name(&record.key_id, target.version);
        audited.detail = format!("to {name}");
        let source_aad = envelope.gcm_aad(&request.associated_data);
        let sealed = GcmCiphertext {
            iv: envelope.nonce,
            ciphertext_and_tag: envelope.sealed.to_vec(),
        };
        let (header, target_aad) =
            seal_header(&record.key_id, target.version, &request.associated_data);
        let resealed = state
            .hsm
            .run(move |session| {
                let plaintext = session.decrypt_gcm(&source_label, &source_aad, &sealed)?;
                session.encrypt_gcm(&target_label, &target_aad, &plaintext)
            })
            .await?;
        Ok(RewrapResponse {
            name,
            ciphertext: assemble(header, resealed.iv, &resealed.ciphertext_and_tag),
            source_name,
        })
    }
}

/// Runs one envelope request: caller, handler, metrics, audit record.
macro_rules! envelope_rpc {
    ($self:ident, $request:ident, $method:literal, $handler:ident) => {{
        let started = Instant::now();
        let mut audited = Audited::start($method);
        audited.resource = $request.get_ref().name.clone();
        let result = async {
            let principal = caller(&$request)?;
            audited.principal = principal.name.clone();
            $self
                .$handler(&mut audited, &principal, $request.into_inner())
                .await
        }
        .await;
        let outcome = result.as_ref().map_or_else(|e| e.reason.as_str(), |_| "ok");
        metrics::envelope($method, outcome, started.elapsed().as_secs_f64());
        audited.finish(&$self.0, result).await.map(Response::new)
    }};
}

#[tonic::async_trait]
impl EnvelopeService for EnvelopeKeys {
    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        envelope_rpc!(self, request, "Encrypt", run_encrypt)
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        envelope_rpc!(self, request, "Decrypt", run_decrypt)
    }

    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        envelope_rpc!(self, request, "GenerateDataKey", run_generate_data_key)
    }

    async fn rewrap(
        &self,
        request: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        envelope_rpc!(self, request, "Rewrap", run_rewrap)
    }
}
