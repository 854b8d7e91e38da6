//! `custody.v1.AuditService`: export and verify the audit chain.

use std::pin::Pin;

use custody_proto::v1::audit_service_server::AuditService;
use custody_proto::v1::{
    AuditHead, AuditRecord, ReadAuditRequest, ReadAuditResponse, VerifyAuditRequest,
    VerifyAuditResponse, read_audit_response,
};
use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::{Audited, Run, Shared, caller, serve};
use custody_core::Error;
use custody_core::authz::{Action, authorize};

/// The audit service.
pub struct Audit(pub Shared);

type AuditStream = Pin<Box<dyn Stream<Item = Result<ReadAuditResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for Audit {
    type ReadAuditStream = AuditStream;

    async fn read_audit(
        &self,
        request: Request<ReadAuditRequest>,
    ) -> Result<Response<AuditStream>, Status> {
        let mut audited = Audited::start("ReadAudit");
        let start = request.get_ref().start_seq.max(1);
        audited.detail = format!("from {start}");
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            authorize(&principal, Action::ReadAudit)
        }
        .await;
        audited.finish(&self.0, result).await?;
        // The head is signed after the read was recorded, so the export
        // includes the record of its own export.
        let head = self
            .0
            .audit
            .signed_head()
            .await
            .map_err(|e| crate::status::to_status(Error::audit_unavailable(&e)))?;
        let pem = self.0.audit.audit_key_pem().to_string();
        let records = self
            .0
            .audit
            .records(start)
            .take_while(move |r| r.as_ref().map_or(true, |r| r.seq <= head.seq))
            .map(|record| {
                record
                    .map(|r| ReadAuditResponse {
                        item: Some(read_audit_response::Item::Record(AuditRecord {
                            seq: r.seq,
                            entry: r.entry,
                            hash: r.hash.to_vec(),
                        })),
                    })
                    .map_err(|e| Status::data_loss(e.to_string()))
            });
        let head_item = ReadAuditResponse {
            item: Some(read_audit_response::Item::Head(AuditHead {
                seq: head.seq,
                hash: head.hash.to_vec(),
                time: head.time,
                signature: head.signature,
                audit_public_key_pem: pem,
            })),
        };
        let stream = tokio_stream::iter(records.chain(std::iter::once(Ok(head_item))));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify_audit(
        &self,
        request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        serve(
            &self.0,
            "VerifyAudit",
            Action::ReadAudit,
            request,
            Run::Inline,
            |_| String::new(),
            |custody, _, _, _| {
                Box::pin(async move {
                    // One verification at a time (the next waits): each
                    // reads the whole log, in constant memory.
                    let _running = custody.limits.audit_verify.start().await;
                    let audit = custody.audit.clone();
                    let report = tokio::task::spawn_blocking(move || audit.verify())
                        .await
                        .map_err(|_| Error::internal("verification task failed"))?;
                    let (first_bad_seq, problem) = report.first_bad.clone().unwrap_or_default();
                    Ok(VerifyAuditResponse {
                        valid: report.first_bad.is_none(),
                        records: report.records,
                        checkpoints: report.checkpoints,
                        first_bad_seq,
                        problem,
                    })
                })
            },
        )
        .await
    }
}
