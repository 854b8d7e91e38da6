//! Reading operations: closed expired ones first, then only what the caller
//! may read (its requester, officers and auditors).

use super::request::{parse_operation_name, store_failure};
use super::vote::expire_due;
use crate::authz::may_read_operation;
use crate::dual_control::operation::{OperationRecord, OperationState};
use crate::identity::Principal;
use crate::{Custody, Error, Reason};

/// Most operations one list returns (newest first).
pub const MAX_LISTED: usize = 1000;

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

/// The newest operations `principal` may read, in `state` if given.
pub async fn operations(
    custody: &Custody,
    principal: &Principal,
    state: Option<OperationState>,
) -> Result<Vec<OperationRecord>, Error> {
    expire_due(custody).await;
    let mut operations = custody.dual_control.operations().map_err(store_failure)?;
    operations.retain(|o| may_read_operation(principal, &o.requester).is_ok());
    operations.retain(|o| state.is_none_or(|wanted| o.state == wanted));
    operations.sort_by_key(|o| std::cmp::Reverse(o.created_ms));
    operations.truncate(MAX_LISTED);
    Ok(operations)
}
