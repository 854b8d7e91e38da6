//! Reading operations: closed expired ones first, then only what the caller
//! may read (its requester, officers and auditors).

use super::request::{parse_operation_name, store_failure};
use super::vote::expire_due;
use crate::authz::{may_read_operation, reads_all_operations};
use crate::dual_control::operation::{OperationRecord, OperationState};
use crate::dual_control::operation_store::{Cursor, Scope};
use crate::identity::Principal;
use crate::{Custody, Error, Reason};

/// Operations one page holds when the caller names no page size.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most operations one page holds.
pub const MAX_PAGE_SIZE: usize = 1000;

/// One page of a list of operations.
#[derive(Debug, Clone)]
pub struct OperationPage {
    /// Newest first.
    pub operations: Vec<OperationRecord>,
    /// The token of the next page; empty on the last.
    pub next_page_token: String,
}

/// The operation `name`, if `principal` may read it.
pub async fn operation(
    custody: &Custody,
    principal: &Principal,
    name: &str,
) -> Result<OperationRecord, Error> {
    let id = parse_operation_name(name)?;
    expire_due(custody).await;
    let record = custody
        .dual_control
        .operation(id)
        .map_err(store_failure)?
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no {name}")))?;
    may_read_operation(principal, &record.requester)?;
    Ok(record)
}

/// A page of the operations `principal` may read, in `state` if given,
/// newest first: officers and auditors read everyone's, anyone else the
/// ones they asked for (from the requester index: others' operations are
/// never read to be filtered out). `page_size` 0 means
/// [`DEFAULT_PAGE_SIZE`]; more than [`MAX_PAGE_SIZE`] is refused, and so
/// is a `page_token` this service did not issue.
pub async fn operations(
    custody: &Custody,
    principal: &Principal,
    state: Option<OperationState>,
    page_size: i32,
    page_token: &str,
) -> Result<OperationPage, Error> {
    let size = match usize::try_from(page_size) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) if n <= MAX_PAGE_SIZE => n,
        _ => {
            return Err(Error::new(
                Reason::BadPageSize,
                format!("page_size {page_size} is not within 0-{MAX_PAGE_SIZE}"),
            ));
        }
    };
    let after = if page_token.is_empty() {
        None
    } else {
        Some(Cursor::parse(page_token).ok_or_else(|| {
            Error::new(
                Reason::BadPageToken,
                "page_token is not one this service issued",
            )
        })?)
    };
    expire_due(custody).await;
    let scope = if reads_all_operations(principal) {
        Scope::All
    } else {
        Scope::RequestedBy(&principal.name)
    };
    let page = custody
        .dual_control
        .operations_page(scope, state, after.as_ref(), size)
        .map_err(store_failure)?;
    Ok(OperationPage {
        operations: page.operations,
        next_page_token: page.next.map(|c| c.token()).unwrap_or_default(),
    })
}
